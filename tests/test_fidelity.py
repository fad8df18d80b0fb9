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
    assert summary["s=0.5"] == {"count": 2, "target": 0.5, "source": 0.5, "other": 0.0}
    assert summary["s=0.9"] == {"count": 2, "target": 1.0, "source": 0.0, "other": 0.0}
    assert summary["all"] == {"count": 4, "target": 0.75, "source": 0.25, "other": 0.0}
    assert monitor.recent_predictions.tolist() == [1, 2, 3, 4]

    merged = FidelityMonitor.merge([monitor.state(), {0.5: [0, 0, 2]}])
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
