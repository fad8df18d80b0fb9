import dataclasses
import math

import numpy as np
import pytest
import torch
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from onlinemix import DiffMix, RandomResizedCropFlip, SampleBatch, TensorSource, one_hot, smooth_labels, translation_label
from onlinemix.crop import crop_box
from tests.helpers import solid_pool

C = 5
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # synthetic pixel v arrives as v / 255

MIX_SETTINGS = [
    dict(mixup_alpha=0.8),
    dict(cutmix_alpha=1.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
    dict(cutmix_minmax=(0.2, 0.8)),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5),
]


def real_batch(batch_size=8, size=8, num_classes=C):
    # Negative pixels: never confused with a synthetic one (v / 255 > 0).
    x = -torch.rand(batch_size, 3, size, size) - 0.01
    y = torch.arange(batch_size) % num_classes
    return x, y


def expected_synthetic_rows(x, source: TensorSource, gamma, num_classes=C):
    """Translation labels of the synthetic images in ``x``, read back from their pixel value."""
    index = (x[:, 0, 0, 0] * 255).round().long() - 200
    pool = source.pool
    return translation_label(pool.source[index], pool.target[index], pool.strength[index], gamma, num_classes)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("settings", MIX_SETTINGS)
def test_equals_timm_mixup_when_p_is_zero(mode, settings):
    ours = DiffMix(**settings, mode=mode, num_classes=C, p=0.0)
    timm = Mixup(**{"mixup_alpha": 0.0, **settings}, mode=mode, num_classes=C)
    for call in range(6):
        x, y = real_batch(size=16)
        np.random.seed(call)
        x_ours, y_ours = ours(x.clone(), y)
        np.random.seed(call)
        x_timm, y_timm = timm(x.clone(), y)
        torch.testing.assert_close(x_ours, x_timm, rtol=0, atol=0)
        torch.testing.assert_close(y_ours, y_timm, rtol=0, atol=1e-6)


def test_p_one_replaces_every_sample_and_labels_follow_metadata():
    pool = solid_pool(C)
    mix = DiffMix(num_classes=C, p=1.0, gamma=0.3, source=pool, label_smoothing=0.0, **RAW)
    x, y = real_batch(batch_size=16)
    out, target = mix(x, y)
    assert out is x  # in place, like timm
    assert torch.all(out > 0), "every sample must be synthetic"
    assert torch.all(out == out[:, :1, :1, :1]), "solid synthetic images must arrive unchanged"
    torch.testing.assert_close(target, expected_synthetic_rows(out, pool, gamma=0.3))
    assert mix.stats() == {"samples": 16, "requested": 16, "replaced": 16, "shortfall": 0, "replaced_fraction": 1.0}


def test_synthetic_images_are_normalised_like_the_batch():
    pool = solid_pool(C)
    mix = DiffMix(num_classes=C, p=1.0, source=pool)
    x, y = real_batch()
    out, _ = mix(x, y)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    pixels = (out * std + mean) * 255
    torch.testing.assert_close(pixels, pixels.round(), rtol=0, atol=1e-3)
    assert pixels.min() >= 200 and pixels.max() < 250


def test_synthetic_images_are_resized_to_the_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[:, :, :, 16:] = 0  # right half black
    pool = TensorSource(images, torch.zeros(4), torch.ones(4), torch.full((4,), 0.5))
    mix = DiffMix(num_classes=C, p=1.0, source=pool, synthetic_transform=None, **RAW)
    out, _ = mix(torch.zeros(6, 3, 12, 20), torch.zeros(6, dtype=torch.long))
    assert out.shape == (6, 3, 12, 20)
    assert torch.all(out[..., 11:] == 0)
    assert torch.all(out[..., :9] > 0)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_realised_fraction_is_binomial_around_p(p):
    pool = solid_pool(C)
    mix = DiffMix(num_classes=C, p=p, source=pool, **RAW)
    calls, batch_size = 150, 32
    replaced = 0
    for _ in range(calls):
        out, _ = mix(*real_batch(batch_size=batch_size))
        replaced += int((out[:, 0, 0, 0] > 0).sum())
    n = calls * batch_size
    assert mix.stats()["replaced"] == replaced
    assert abs(replaced / n - p) < 4.5 * math.sqrt(p * (1 - p) / n)


def test_shortfall_leaves_the_rest_real_and_is_counted():
    class OneAtATime:
        def __init__(self, pool):
            self.pool = pool

        def take(self, n):
            return self.pool.take(min(n, 1))

    pool = solid_pool(C)
    mix = DiffMix(num_classes=C, p=1.0, source=OneAtATime(pool), label_smoothing=0.0, **RAW)
    x, y = real_batch()
    out, target = mix(x, y)
    synthetic = out[:, 0, 0, 0] > 0
    assert int(synthetic.sum()) == 1
    torch.testing.assert_close(target[~synthetic], one_hot(y[~synthetic], C))
    assert mix.stats()["shortfall"] == 7 and mix.stats()["replaced"] == 1


def _replacement_then_mixing(mode, **mix_settings):
    """The same seed with and without CutMix: the batch before mixing, and after."""
    pool = solid_pool(C)
    x, y = real_batch(size=16)
    plain = DiffMix(num_classes=C, p=0.5, source=pool, label_smoothing=0.0, mode=mode, **RAW)
    mixed = DiffMix(num_classes=C, p=0.5, source=pool, label_smoothing=0.0, mode=mode, **RAW, **mix_settings)
    np.random.seed(7)
    x_before, y_before = plain(x.clone(), y)
    np.random.seed(7)
    x_after, y_after = mixed(x.clone(), y)
    return x_before, y_before, x_after, y_after


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_composes_after_replacement_and_weights_labels_by_box_area(mode):
    saw_synthetic_box = False
    for trial in range(5):
        np.random.seed(trial)
        x_before, y_before, x_after, y_after = _replacement_then_mixing(mode, cutmix_alpha=1.0)
        torch.testing.assert_close(y_after.sum(1), torch.ones(len(y_after)))
        batch_size, _, height, width = x_before.shape
        for i in range(batch_size):
            j = batch_size - 1 - i
            changed = (x_after[i] != x_before[i]).any(0)
            rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
            if changed.any():
                box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
                assert box.all(), "CutMix must paste one rectangle"
                assert torch.equal(x_after[i][:, changed], x_before[j][:, changed])
                saw_synthetic_box |= bool(x_before[j, 0, 0, 0] > 0 and x_before[i, 0, 0, 0] < 0)
            lam = 1 - changed.sum().item() / (height * width)
            torch.testing.assert_close(y_after[i], lam * y_before[i] + (1 - lam) * y_before[j])
    assert saw_synthetic_box, "some CutMix box should carry a synthetic image onto a real one"


def test_mixup_mixes_soft_labels_of_synthetic_samples():
    np.random.seed(3)
    x_before, y_before, x_after, y_after = _replacement_then_mixing("batch", mixup_alpha=1.0)
    b = len(x_before)
    # Recover the batch lambda from the pixels of one pair.
    lam = ((x_after[0] - x_before[b - 1]) / (x_before[0] - x_before[b - 1])).mean().item()
    torch.testing.assert_close(x_after, lam * x_before + (1 - lam) * x_before.flip(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(y_after, lam * y_before + (1 - lam) * y_before.flip(0), rtol=0, atol=1e-5)


def test_disabled_mixing_returns_real_batch_with_smoothed_one_hot():
    class Untouchable:
        def take(self, n):
            raise AssertionError("a disabled DiffMix must not read its source")

    mix = DiffMix(cutmix_alpha=1.0, mixup_alpha=0.8, num_classes=C, p=1.0, source=Untouchable())
    mix.mixup_enabled = False
    x, y = real_batch()
    out, target = mix(x.clone(), y)
    assert torch.equal(out, x)
    torch.testing.assert_close(target, smooth_labels(one_hot(y, C), 0.1))


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_odd_batches_work_in_batch_and_elem_modes(mode):
    mix = DiffMix(cutmix_alpha=1.0, mixup_alpha=0.5, mode=mode, num_classes=C, p=0.5, source=solid_pool(C))
    for _ in range(5):
        out, target = mix(*real_batch(batch_size=7))
        assert out.shape == (7, 3, 8, 8) and target.shape == (7, C)
        torch.testing.assert_close(target.sum(1), torch.ones(7))


def test_pair_mode_with_odd_batch_says_drop_last():
    mix = DiffMix(cutmix_alpha=1.0, mode="pair", num_classes=C, p=0.0)
    with pytest.raises(ValueError, match="drop_last=True"):
        mix(*real_batch(batch_size=7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_batches_keep_their_dtype(dtype):
    mix = DiffMix(cutmix_alpha=1.0, mixup_alpha=0.8, num_classes=C, p=0.5, source=solid_pool(C), **RAW)
    x, y = real_batch()
    out, target = mix(x.to(dtype), y)
    assert out.dtype == dtype and target.dtype == torch.float32
    torch.testing.assert_close(target.sum(1), torch.ones(8))


def test_soft_targets_in_are_mixed_and_smoothed():
    mix = DiffMix(mixup_alpha=1.0, num_classes=3, p=0.0, label_smoothing=0.1)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]])
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2).clone()
    out, target = mix(x, soft)
    lam = (out[0, 0, 0, 0] - 3.0) / (0.0 - 3.0)  # x0 = lam * 0 + (1 - lam) * 3
    expected = smooth_labels(lam * soft + (1 - lam) * soft.flip(0), 0.1)
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-5)


def test_seeded_runs_are_reproducible_and_seeds_differ():
    def run(seed):
        np.random.seed(seed)
        mix = DiffMix(cutmix_alpha=1.0, num_classes=C, p=0.5, source=solid_pool(C))
        return mix(*real_batch(batch_size=16))

    torch.manual_seed(0)
    a = run(1)
    torch.manual_seed(0)
    b = run(1)
    torch.manual_seed(0)
    c = run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_synthetic_transform_is_applied_and_checked():
    calls = []

    def mark_corner(images):
        calls.append(images.shape)
        images = images.clone()
        images[:, :, 0, 0] = 255
        return images

    mix = DiffMix(num_classes=C, p=1.0, source=solid_pool(C), synthetic_transform=mark_corner, **RAW)
    out, _ = mix(*real_batch())
    assert calls == [(8, 3, 8, 8)]
    assert torch.all(out[:, :, 0, 0] == 1.0)

    bad = DiffMix(num_classes=C, p=1.0, source=solid_pool(C), synthetic_transform=lambda im: im.float())
    with pytest.raises(ValueError, match="uint8"):
        bad(*real_batch())


class FixedSource:
    def __init__(self, **fields):
        k = 2
        base = dict(
            images=torch.zeros(k, 3, 4, 4, dtype=torch.uint8),
            source=torch.zeros(k, dtype=torch.long),
            target=torch.ones(k, dtype=torch.long),
            strength=torch.full((k,), 0.5),
        )
        base.update(fields)
        self.fields = base

    def take(self, n):
        return SampleBatch(**{name: value[:n] for name, value in self.fields.items()})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(p=1.5, source=solid_pool(C)), "p is a probability"),
        (dict(p=-0.1, source=solid_pool(C)), "p is a probability"),
        (dict(prob=2.0, p=0.0), "prob is a probability"),
        (dict(switch_prob=-1.0, p=0.0), "switch_prob"),
        (dict(p=0.1), "no source was given"),
        (dict(p=0.1, source=object()), "take"),
        (dict(gamma=-0.5, p=0.0), "gamma must be a finite number >= 0"),
        (dict(cutmix_alpha=-1.0, p=0.0), "cutmix_alpha must be a finite number >= 0"),
        (dict(num_classes=1, p=0.0), "num_classes must be an integer >= 2"),
        (dict(mode="half", p=0.0), "mode must be"),
        (dict(cutmix_minmax=(0.8, 0.2), p=0.0), "cutmix_minmax"),
        (dict(label_smoothing=1.0, p=0.0), "label_smoothing"),
        (dict(multi_label=True, p=0.0), "multi_label"),
        (dict(std=(0.0, 1.0, 1.0), p=0.0), "std > 0"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, message):
    kwargs = {"num_classes": C, **kwargs}
    with pytest.raises(ValueError, match=message):
        DiffMix(**kwargs)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(images=torch.zeros(2, 3, 4, 4)), "uint8"),
        (dict(images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8)), "uint8 RGB"),
        (dict(strength=torch.tensor([0.5, 1.5])), r"strength must lie in \[0, 1\]"),
        (dict(target=torch.tensor([1, C])), f"num_classes={C}"),
        (dict(source=torch.tensor([C + 3, 0])), f"class index {C + 3}"),
    ],
)
def test_bad_samples_from_the_source_are_reported(fields, message):
    mix = DiffMix(num_classes=C, p=1.0, source=FixedSource(**fields))
    with pytest.raises(ValueError, match=message):
        mix(*real_batch(batch_size=2))


def test_bad_batches_are_reported():
    mix = DiffMix(num_classes=C, p=0.5, source=solid_pool(C))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        mix(*real_batch()[:1], torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]))
    with pytest.raises(ValueError, match="3 channels"):
        mix(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target holds 3"):
        mix(torch.zeros(2, 3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="float or uint8"):
        mix(torch.zeros(2, 3, 8, 8, dtype=torch.int32), torch.zeros(2, dtype=torch.long))


def coordinate_image(size=64):
    """uint8 [3, size, size]: red grows with x, green with y, so a crop's scale and place show in its pixels."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([xs * (256 // size), ys * (256 // size), torch.full_like(xs, 128)]).to(torch.uint8)


def crop_statistics(batch):
    """Mean per-image spread of red and of green (the crop's width and height) and the spread of the images'
    mean red and mean green (the crop's place and flip), each with its standard error."""
    r, g = batch[:, 0].float(), batch[:, 1].float()
    n = len(batch)
    spreads = [r.std((1, 2)), g.std((1, 2))]
    places = [r.mean((1, 2)), g.mean((1, 2))]
    values = [v.mean() for v in spreads] + [v.std() for v in places]
    errors = [v.std() / n ** 0.5 for v in spreads] + [v.std() / (2 * n) ** 0.5 for v in places]
    return np.array(values), np.array(errors)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.35, 1.0)])
def test_synthetic_images_get_the_crop_and_flip_of_real_images(scale):
    """Synthetic images through DiffMix look, crop-wise, like real images through torchvision's
    RandomResizedCrop + RandomHorizontalFlip (timm's training transform; train.py's scale 0.35)."""
    from PIL import Image
    from torchvision import transforms as T

    n, image = 1500, coordinate_image()
    real_transform = T.Compose([T.RandomResizedCrop(32, scale=scale), T.RandomHorizontalFlip(), T.PILToTensor()])
    torch.manual_seed(0)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    real = torch.stack([real_transform(pil) for _ in range(n)])
    source = TensorSource(image[None].repeat(n, 1, 1, 1), torch.zeros(n), torch.zeros(n), torch.ones(n))
    options = {} if scale == (0.08, 1.0) else dict(synthetic_transform=RandomResizedCropFlip(scale=scale))
    mix = DiffMix(num_classes=2, p=1.0, source=source, label_smoothing=0.0, **options, **RAW)
    np.random.seed(0)
    synthetic, _ = mix(torch.zeros(n, 3, 32, 32), torch.zeros(n, dtype=torch.long))
    (ours, our_error), (theirs, their_error) = crop_statistics(synthetic * 255), crop_statistics(real)
    assert np.all(np.abs(ours - theirs) < 4 * np.hypot(our_error, their_error)), (ours, theirs)


def test_crop_boxes_and_flips():
    np.random.seed(1)
    boxes = np.array([crop_box(48, 64, (0.25, 0.5), (1.0, 2.0)) for _ in range(2000)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= 48) & (left + w <= 64))
    area = h * w / (48 * 64)
    assert area.min() > 0.23 and area.max() < 0.52 and abs(area.mean() - 0.375) < 0.01
    assert np.all((w / h > 0.95) & (w / h < 2.1))
    assert crop_box(10, 100, (0.9, 1.0), (0.75, 1.33)) == (0, 43, 10, 13), "no fit in 10 tries: centred, ratio-clamped"
    images = coordinate_image(16)[None].repeat(400, 1, 1, 1)
    np.random.seed(2)
    flipped = RandomResizedCropFlip(scale=(1, 1), ratio=(1, 1))(images)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert flipped.dtype == torch.uint8 and flipped.shape == images.shape
    assert torch.all(mirrored | (flipped == images).flatten(1).all(1)) and abs(mirrored.float().mean() - 0.5) < 0.08
    assert not RandomResizedCropFlip(scale=(1, 1), ratio=(1, 1), flip=0.0)(images).ne(images).any()
    resized = RandomResizedCropFlip(size=(12, 20))(images)
    assert resized.shape == (400, 3, 12, 20) and resized.dtype == torch.uint8, "each crop resized once, to size"
    assert RandomResizedCropFlip(size=9)(images[:2]).shape == (2, 3, 9, 9)
    for kwargs, message in ((dict(scale=(0.5, 0.2)), "scale"), (dict(ratio=(2, 1)), "ratio"), (dict(flip=2), "flip"),
                            (dict(size=(0, 4)), "size")):
        with pytest.raises(ValueError, match=message):
            RandomResizedCropFlip(**kwargs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        RandomResizedCropFlip().flip = 1.0  # frozen: DiffMix's default instance is shared by every DiffMix
