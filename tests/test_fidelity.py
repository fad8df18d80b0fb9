import torch

from onlinemix import DiffMix, FidelityMonitor, SyntheticRows, TensorSource
from onlinemix.fidelity import classifier_calls


def test_classifier_calls_name_target_source_or_other():
    predicted = torch.tensor([2, 0, 1, 3, 4])
    source = torch.tensor([0, 0, 1, 0, 4])
    target = torch.tensor([2, 1, 3, 1, 4])
    assert classifier_calls(predicted, source, target).tolist() == [0, 1, 1, 2, 0], "intra-class counts as target"


def test_shares_per_strength_on_known_predictions():
    monitor = FidelityMonitor()
    logits = torch.zeros(6, 5)
    logits[torch.arange(6), torch.tensor([9 % 5, 1, 2, 3, 4, 0])] = 1.0  # top-1 per row: 4 1 2 3 4 0
    synthetic = SyntheticRows(rows=torch.tensor([1, 2, 3, 4]), source=torch.tensor([0, 2, 0, 1]),
                              target=torch.tensor([1, 3, 3, 4]), strength=torch.tensor([0.5, 0.5, 0.9, 0.9]))
    monitor.update(logits, synthetic)  # row 1 -> 1 (target), 2 -> 2 (source), 3 -> 3 (target), 4 -> 4 (target)
    monitor.update(logits, None)
    summary = FidelityMonitor.summary(monitor.state())
    assert summary["s=0.5"] == {"count": 2, "target": 0.5, "source": 0.5, "other": 0.0}, "no first reads known"
    assert summary["s=0.9"] == {"count": 2, "target": 1.0, "source": 0.0, "other": 0.0}
    assert summary["all"] == {"count": 4, "target": 0.75, "source": 0.25, "other": 0.0}

    merged = FidelityMonitor.merge([monitor.state(), {0.5: [0, 0, 2, 0, 0, 0]}])
    assert FidelityMonitor.summary(merged)["s=0.5"] == {"count": 4, "target": 0.25, "source": 0.25, "other": 0.5}
    monitor.reset()
    assert FidelityMonitor.summary(monitor.state()) == {}


def test_diffmix_says_which_rows_it_replaced():
    images = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    source = TensorSource(images, torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2]),
                          torch.tensor([0.5, 0.7, 0.9, 0.5]))
    mix = DiffMix(num_classes=3, p=0.5, source=source, label_smoothing=0.0, synthetic_transform=None)
    torch.manual_seed(0)
    x = torch.zeros(16, 3, 8, 8, dtype=torch.uint8)
    x, y = mix(x, torch.zeros(16, dtype=torch.int64))
    rows = mix.synthetic.rows
    replaced = (x.flatten(1) == 255).all(1).nonzero().flatten()
    assert len(rows) > 0 and sorted(rows.tolist()) == replaced.tolist()
    assert torch.equal(y[rows].argmax(1), mix.synthetic.target), "s^0.5 > 0.5: the target leads each label"
    mix.p = 0.0
    mix(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    assert mix.synthetic is None, "a batch without replacement says so"


def test_first_reads_are_counted_apart_from_rereads():
    """A sample the classifier has learned reads as its label on later reads; its first read tells
    whether the generator rendered the target."""
    monitor = FidelityMonitor()
    logits = torch.zeros(4, 3)
    logits[torch.arange(4), torch.tensor([0, 1, 2, 2])] = 1.0  # top-1 per row: 0 1 2 2
    rows = SyntheticRows(rows=torch.arange(4), source=torch.tensor([2, 2, 0, 0]), target=torch.tensor([1, 1, 2, 2]),
                         strength=torch.tensor([0.7, 0.7, 0.7, 0.7]),
                         first_read=torch.tensor([True, False, True, False]))
    monitor.update(logits, rows)  # first reads: row 0 -> other, row 2 -> target; rereads: 1, 3 -> target
    summary = FidelityMonitor.summary(monitor.state())["s=0.7"]
    assert summary["count"] == 4 and summary["target"] == 0.75 and summary["other"] == 0.25
    assert summary["first_read"] == {"count": 2, "target": 0.5, "source": 0.0, "other": 0.5}


def test_the_bundled_sources_mark_each_samples_first_read():
    import numpy as np

    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    source = TensorSource(images, torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]), torch.tensor([0.5, 0.7, 0.9]))
    np.random.seed(0)
    batches = [source.take(4) for _ in range(5)]
    drawn = torch.cat([b.source for b in batches])  # the sources 0, 1, 2 name the three samples
    first = torch.cat([b.first_read for b in batches])
    assert sorted(drawn[first].tolist()) == [0, 1, 2], "each sample's first read, once, duplicates in a take too"
    assert torch.equal(batches[0].select(torch.tensor([1, 0])).first_read, batches[0].first_read[[1, 0]])
