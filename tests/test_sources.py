import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from onlinemix import DiffMix, ReplaySource, SampleBatch, SampleSource, TensorSource, translation_label

CLASSES = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty/Albatross"]


def write_offline_output(root, rows, size=(24, 20)):
    """A directory in the layout of Diff-Mix's scripts/sample_mp.py.

    Folders and files use the class name with ' ' and '/' turned into '_'; meta.csv
    turns '_' back into ' '. Each image is one flat colour: (10 * number, 0, 0).
    """
    records = []
    for source, target, number, strength in rows:
        folder = source.replace(" ", "_").replace("/", "_")
        name = f"{target.replace(' ', '_').replace('/', '_')}-{number:06d}-{strength}.png"
        os.makedirs(root / "data" / folder, exist_ok=True)
        Image.new("RGB", size, (10 * number, 0, 0)).save(root / "data" / folder / name)
        records.append({
            "First Directory": folder.replace("_", " "),
            "Second Directory": target.replace("/", "_").replace("_", " "),
            "Number": number,
            "Strength": strength,
            "Path": os.path.join(folder, name),
        })
    with open(root / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["First Directory", "Second Directory", "Number", "Strength", "Path"])
        writer.writeheader()
        writer.writerows(records)


ROWS = [
    ("Black_footed_Albatross", "Laysan_Albatross", 1, 0.7),
    ("Laysan_Albatross", "Sooty/Albatross", 2, 0.5),
    ("Sooty/Albatross", "Sooty/Albatross", 3, 0.9),
    ("Laysan_Albatross", "Black_footed_Albatross", 4, 0.3),
]


def test_replay_source_serves_the_official_layout(tmp_path):
    write_offline_output(tmp_path, ROWS)
    replay = ReplaySource(tmp_path, CLASSES, size=16)
    assert isinstance(replay, SampleSource) and len(replay) == 4
    batch = replay.take(32)
    assert isinstance(batch, SampleBatch)
    assert batch.images.shape == (32, 3, 16, 16) and batch.images.dtype == torch.uint8
    expected = {number: (CLASSES.index(s), CLASSES.index(t), st) for s, t, number, st in ROWS}
    for k in range(32):
        number = int(batch.images[k, 0, 8, 8]) // 10
        assert torch.all(batch.images[k, 0] == 10 * number) and torch.all(batch.images[k, 1:] == 0)
        source, target, strength = expected[number]
        assert (int(batch.source[k]), int(batch.target[k])) == (source, target)
        assert batch.strength[k].item() == pytest.approx(strength)
    assert len({int(v) for v in batch.images[:, 0, 0, 0]}) == 4  # draws spread over the pool


def test_replay_source_feeds_diffmix_with_translation_labels(tmp_path):
    write_offline_output(tmp_path, ROWS)
    replay = ReplaySource(tmp_path, CLASSES, size=(8, 12))
    mix = DiffMix(num_classes=3, p=1.0, gamma=0.5, source=replay, label_smoothing=0.0,
                  mean=(0, 0, 0), std=(1, 1, 1))
    out, target = mix(torch.zeros(6, 3, 8, 12), torch.zeros(6, dtype=torch.long))
    numbers = (out[:, 0, 4, 6] * 255).round().long() // 10
    meta = {number: (CLASSES.index(s), CLASSES.index(t), st) for s, t, number, st in ROWS}
    source, tgt, strength = (torch.tensor([meta[int(n)][i] for n in numbers]) for i in range(3))
    torch.testing.assert_close(target, translation_label(source, tgt, strength.float(), 0.5, 3))


def test_replay_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.csv"):
        ReplaySource(tmp_path, CLASSES, size=16)

    write_offline_output(tmp_path, ROWS)
    with pytest.raises(ValueError, match="not in class_names"):
        ReplaySource(tmp_path, CLASSES[:2], size=16)
    with pytest.raises(ValueError, match="the same once"):
        ReplaySource(tmp_path, CLASSES + ["Black footed Albatross"], size=16)
    with pytest.raises(ValueError, match="size must be positive"):
        ReplaySource(tmp_path, CLASSES, size=0)

    os.remove(tmp_path / "data" / "Laysan_Albatross" / "Sooty_Albatross-000002-0.5.png")
    with pytest.raises(FileNotFoundError, match="1 of the 4 images"):
        ReplaySource(tmp_path, CLASSES, size=16)


def test_replay_source_rejects_bad_meta(tmp_path):
    write_offline_output(tmp_path, ROWS[:1])
    meta = (tmp_path / "meta.csv").read_text()
    (tmp_path / "meta.csv").write_text(meta.replace(",0.7,", ",1.7,"))
    with pytest.raises(ValueError, match=r"line 2: Strength must be a number in \[0, 1\]"):
        ReplaySource(tmp_path, CLASSES, size=16)
    (tmp_path / "meta.csv").write_text(meta.replace("Strength", "Strenght"))
    with pytest.raises(ValueError, match="lacks the columns"):
        ReplaySource(tmp_path, CLASSES, size=16)


@pytest.mark.parametrize("path", ["../../secret.png", "/etc/hostname", "a/../../meta.csv", "."])
def test_replay_paths_outside_the_folder_are_refused(tmp_path, path):
    write_offline_output(tmp_path / "replay", ROWS)
    meta = (tmp_path / "replay" / "meta.csv").read_text().splitlines()
    meta[2] = ",".join(meta[2].split(",")[:-1] + [path])
    (tmp_path / "replay" / "meta.csv").write_text("\n".join(meta) + "\n")
    with pytest.raises(ValueError, match=r"meta.csv, line 3: Path .* points outside"):
        ReplaySource(tmp_path / "replay", CLASSES, size=16)


def test_a_damaged_replay_image_is_refused_before_any_is_drawn(tmp_path):
    write_offline_output(tmp_path, ROWS)
    (tmp_path / "data" / "Laysan_Albatross" / "Sooty_Albatross-000002-0.5.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match="1 of the 4 images in .*meta.csv cannot be read"):
        ReplaySource(tmp_path, CLASSES, size=16)


def test_tensor_source_draws_uniformly_with_replacement():
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    pool = TensorSource(images, torch.arange(4), torch.arange(4), torch.full((4,), 0.5))
    np.random.seed(0)
    batch = pool.take(4000)
    counts = torch.bincount(batch.images[:, 0, 0, 0].long(), minlength=4)
    assert counts.min() > 850 and counts.max() < 1150
    assert torch.equal(batch.source, batch.images[:, 0, 0, 0].long())
    assert len(pool.take(0)) == 0


def test_sample_batch_and_tensor_source_validate():
    with pytest.raises(ValueError, match="empty pool"):
        TensorSource(torch.zeros(0, 3, 2, 2, dtype=torch.uint8), torch.zeros(0), torch.zeros(0), torch.zeros(0))
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        SampleBatch(images, torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match="integer class indices"):
        SampleBatch(images, torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match="negative"):
        SampleBatch(images, torch.tensor([0, -1]), torch.zeros(2, dtype=torch.long), torch.zeros(2))
