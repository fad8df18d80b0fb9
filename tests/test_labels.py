import pytest
import torch
from timm.data.mixup import mixup_target

from onlinemix.labels import as_soft_targets, mix_labels, one_hot, smooth_labels, translation_label


@pytest.mark.parametrize(
    "gamma, strength, source_share, target_share",
    [(0.1, 0.7, 0.04, 0.96), (0.5, 0.7, 0.16, 0.84)],  # the caption of the paper's Table 6
)
def test_translation_label_reproduces_paper_table_6(gamma, strength, source_share, target_share):
    rows = translation_label(torch.tensor([2]), torch.tensor([5]), torch.tensor([strength]), gamma, 8)
    assert round(rows[0, 2].item(), 2) == source_share
    assert round(rows[0, 5].item(), 2) == target_share
    assert rows[0].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.count_nonzero(rows) == 2


def test_translation_label_batched_values_and_invariants():
    source = torch.tensor([0, 1, 3, 3, 2])
    target = torch.tensor([1, 1, 0, 3, 2])
    strength = torch.tensor([0.5, 0.9, 0.25, 1.0, 0.0])
    rows = translation_label(source, target, strength, 0.5, 4)
    assert rows.dtype == torch.float32 and rows.shape == (5, 4)
    torch.testing.assert_close(rows.sum(1), torch.ones(5))
    assert rows[0, 1].item() == pytest.approx(0.5 ** 0.5)
    assert rows[0, 0].item() == pytest.approx(1 - 0.5 ** 0.5)
    # Intra-class translation (Diff-Aug, Diff-Gen) is one-hot whatever the strength.
    torch.testing.assert_close(rows[1], one_hot(torch.tensor([1]), 4)[0])
    torch.testing.assert_close(rows[3], one_hot(torch.tensor([3]), 4)[0])
    # Strength 0 leaves the reference's class; gamma 0 hands everything to the prompt's class.
    torch.testing.assert_close(rows[4], one_hot(torch.tensor([2]), 4)[0])
    gamma0 = translation_label(source, target, strength, 0.0, 4)
    torch.testing.assert_close(gamma0, one_hot(target, 4))


def test_translation_weight_grows_with_strength_and_shrinks_with_gamma():
    strength = torch.tensor([0.5, 0.7, 0.9])
    low = translation_label(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), strength, 0.1, 2)
    high = translation_label(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), strength, 0.5, 2)
    assert torch.all(low[1:, 1] > low[:-1, 1])
    assert torch.all(low[:, 1] > high[:, 1])


def test_smoothing_matches_timm_formula():
    labels = torch.tensor([0, 3, 2, 9])
    ours = smooth_labels(one_hot(labels, 10), 0.1)
    timm = mixup_target(labels, 10, lam=1.0, smoothing=0.1)
    torch.testing.assert_close(ours, timm)
    assert ours[0, 0].item() == pytest.approx(1 - 0.1 + 0.01)
    assert ours[0, 1].item() == pytest.approx(0.01)
    torch.testing.assert_close(smooth_labels(one_hot(labels, 10), 0.0), one_hot(labels, 10))


def test_mix_labels_pairs_i_with_its_mirror_and_conserves_mass():
    rows = translation_label(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]), torch.tensor([0.5, 0.7, 0.9]), 0.5, 3)
    mixed = mix_labels(rows, 0.3)
    torch.testing.assert_close(mixed[0], 0.3 * rows[0] + 0.7 * rows[2])
    torch.testing.assert_close(mixed[1], rows[1])  # odd batch: the middle sample pairs with itself
    per_sample = torch.tensor([[1.0], [0.25], [0.6]])
    mixed = mix_labels(rows, per_sample)
    torch.testing.assert_close(mixed[2], 0.6 * rows[2] + 0.4 * rows[0])
    torch.testing.assert_close(mixed.sum(1), torch.ones(3))


def test_as_soft_targets_accepts_labels_and_soft_rows():
    torch.testing.assert_close(as_soft_targets(torch.tensor([1, 0]), 3), one_hot(torch.tensor([1, 0]), 3))
    soft = torch.tensor([[0.2, 0.8, 0.0]], dtype=torch.float64)
    out = as_soft_targets(soft, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, soft.float())


@pytest.mark.parametrize(
    "target, message",
    [
        (torch.tensor([0, 3]), r"\[0, 3\)"),
        (torch.tensor([-1, 0]), r"\[0, 3\)"),
        (torch.tensor([0.0, 1.0]), "integer dtype"),
        (torch.zeros(2, 4), r"\[B, 3\]"),
        (torch.zeros(2, 3, 1), r"\[B, 3\]"),
    ],
)
def test_as_soft_targets_rejects_bad_targets(target, message):
    with pytest.raises(ValueError, match=message):
        as_soft_targets(target, 3)
