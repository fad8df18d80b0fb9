"""The sample grid: a fixed number of captioned tiles per epoch, named classes, the classifier's call."""
import torch
from PIL import Image

from onlinemix.batch import SyntheticRows
from onlinemix.labels import translation_label
from onlinemix.run_files import SampleGrid, tile_caption

NAMES = ["ember finch", "azure wader", "golden swift", "rosy swift"]


def step(k, source, target, strength, called, size=32):
    """One training step's ``DiffMix.recent`` and ``DiffMix.synthetic`` with K rows replaced, and logits
    whose top-1 on each replaced row is ``called``."""
    source, target = torch.full((k,), source), torch.full((k,), target)
    strength = torch.full((k,), strength)
    images = torch.randint(0, 256, (k, 3, size, size), dtype=torch.uint8)
    labels = translation_label(source, target, strength, 0.5, len(NAMES))
    rows = torch.arange(k) * 2  # every other row of a batch of 2K
    logits = torch.zeros(2 * k, len(NAMES))
    logits[rows, called] = 1.0
    return (images, labels), SyntheticRows(rows, source, target, strength), logits


def test_a_caption_names_the_classes_their_weights_and_the_call():
    label = translation_label(torch.tensor([1]), torch.tensor([0]), torch.tensor([0.49]), 0.5, 4)[0]
    assert tile_caption(NAMES, 0, 1, label, 0.49, 1) == [
        "to 0.70: ember finch", "from 0.30: azure wader", "s=0.49, called: source"]
    assert tile_caption(NAMES, 2, 2, torch.eye(4)[2], 0.7, 2) == [
        "to 1.00: golden swift", "from: the same class", "s=0.70, called: target"]
    assert tile_caption(NAMES, 0, 1, label, 0.49, 3)[2] == "s=0.49, called: rosy swift"
    assert tile_caption(NAMES, 0, 1, label, 0.49, None)[2] == "s=0.49", "no call known"


def test_each_epoch_draws_the_first_sixteen_samples_then_starts_again(tmp_path):
    grid = SampleGrid(NAMES, tiles=16, tile_size=64)
    for _ in range(3):  # 3 steps of 7: 21 samples, the grid keeps the first 16
        grid.add(*step(7, source=1, target=0, strength=0.5, called=0))
    grid.add(None, None, torch.zeros(4, 4))  # a step that replaced nothing
    assert [lines[0] for _, lines in grid.entries] == ["to 0.71: ember finch"] * 16
    assert grid.entries[0][1][2] == "s=0.50, called: target"
    assert grid.save(str(tmp_path / "epoch1.png"), 1)
    with Image.open(tmp_path / "epoch1.png") as image:
        width, height = image.size
    assert width == 8 * 64
    cell = 64 + 3 * SampleGrid.LINE + 6
    assert (height - 2 * cell) > 0 and (height - 2 * cell) < cell, "a legend, then two rows of eight tiles"

    grid.add(*step(3, source=2, target=2, strength=0.7, called=1))
    assert len(grid.entries) == 3 and grid.seen == 3, "save starts the next epoch's grid"
    assert not SampleGrid(NAMES).save(str(tmp_path / "none.png"), 2)
    assert not (tmp_path / "none.png").exists(), "an epoch without synthetic samples writes no grid"
