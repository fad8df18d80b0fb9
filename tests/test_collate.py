import numpy as np
import pytest
import torch
from timm.data import FastCollateMixup
from timm.data.loader import PrefetchLoader
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, default_collate

from onlinemix import DiffMix, DiffMixCollate, one_hot, smooth_labels
from tests.helpers import solid_pool

C = 5


class UInt8Images(Dataset):
    """What timm's prefetcher transforms yield: uint8 CHW NumPy arrays below 200, and a label."""

    def __init__(self, n=16, size=8, as_numpy=True):
        g = torch.Generator().manual_seed(3)
        self.images = torch.randint(0, 200, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.as_numpy = as_numpy

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i].numpy().copy() if self.as_numpy else self.images[i].clone()
        return image, i % C


MIX_SETTINGS = [
    dict(mixup_alpha=0.8),
    dict(cutmix_alpha=1.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0),
    dict(cutmix_minmax=(0.25, 0.75), prob=0.7),
]


@pytest.mark.parametrize("as_numpy", [True, False])
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("settings", MIX_SETTINGS)
def test_collate_equals_timm_fast_collate_when_p_is_zero(mode, settings, as_numpy):
    data = UInt8Images(as_numpy=as_numpy)
    ours = DiffMixCollate(**settings, mode=mode, num_classes=C, p=0.0)
    timm = FastCollateMixup(**{"mixup_alpha": 0.0, **settings}, mode=mode, num_classes=C)
    for call in range(5):
        np.random.seed(call)
        x_ours, y_ours = ours([data[i] for i in range(8)])
        np.random.seed(call)
        x_timm, y_timm = timm([data[i] for i in range(8)])
        assert x_ours.dtype == torch.uint8
        assert torch.equal(x_ours, x_timm)
        torch.testing.assert_close(y_ours, y_timm, rtol=0, atol=1e-6)


def test_prefetch_loader_path_with_mixup_enabled_propagation():
    pool = solid_pool(C, size=16)
    collate = DiffMixCollate(cutmix_alpha=1.0, num_classes=C, p=1.0, source=pool, label_smoothing=0.1)
    assert isinstance(collate, FastCollateMixup)
    loader = PrefetchLoader(
        DataLoader(UInt8Images(size=8), batch_size=8, collate_fn=collate, drop_last=True),
        device=torch.device("cpu"),
    )
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255

    x, target = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (8, 3, 8, 8)
    pixels = x * std + mean
    assert pixels.min() >= 199.5, "with p=1 every pixel is synthetic (values 200-249), resized to 8x8"
    assert target.shape == (8, C) and target.dtype == torch.float32
    torch.testing.assert_close(target.sum(1), torch.ones(8))

    assert loader.mixup_enabled
    loader.mixup_enabled = False  # what timm's train.py does after --mixup-off-epoch
    assert collate.mixup_enabled is False
    x, target = next(iter(loader))
    data = UInt8Images(size=8)
    torch.testing.assert_close(x * std + mean, data.images[:8].float(), rtol=0, atol=1e-3)
    torch.testing.assert_close(target, smooth_labels(one_hot(torch.arange(8) % C, C), 0.1))


def test_collate_keeps_synthetic_pixels_raw_and_rejects_float_samples():
    collate = DiffMixCollate(num_classes=C, p=1.0, source=solid_pool(C), label_smoothing=0.0)
    data = UInt8Images()
    x, target = collate([data[i] for i in range(4)])
    assert x.dtype == torch.uint8 and int(x.min()) >= 200
    torch.testing.assert_close(target.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="uint8"):
        collate([(np.zeros((3, 8, 8), np.float32), 0), (np.zeros((3, 8, 8), np.float32), 1)])


class MixingCollate:
    """torchvision style: ``collate_fn=lambda b: mix(*default_collate(b))``, picklable for workers."""

    def __init__(self, mix):
        self.mix = mix

    def __call__(self, batch):
        return self.mix(*default_collate(batch))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_torchvision_style_collate_in_dataloader_workers(num_workers):
    class FloatImages(Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return -torch.rand(3, 8, 8) - 0.01, i % C

    mix = DiffMix(cutmix_alpha=1.0, num_classes=C, p=0.5, source=solid_pool(C), mean=(0, 0, 0), std=(1, 1, 1))
    loader = DataLoader(FloatImages(), batch_size=8, num_workers=num_workers, collate_fn=MixingCollate(mix))
    synthetic = 0
    for x, target in loader:
        assert x.shape == (8, 3, 8, 8) and target.shape == (8, C)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        synthetic += int((x > 0).flatten(1).any(1).sum())
    assert synthetic > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_collate_counts_replacements_made_in_dataloader_workers(num_workers):
    """The training process's stats() sees what the workers' copies of the collate replaced."""
    collate = DiffMixCollate(num_classes=C, p=0.5, source=solid_pool(C), label_smoothing=0.0)
    loader = DataLoader(UInt8Images(n=32), batch_size=8, num_workers=num_workers, collate_fn=collate)
    synthetic = sum(int((x.flatten(1).min(1).values >= 200).sum()) for x, _ in loader)
    stats = collate.stats()
    assert stats["samples"] == 32
    assert stats["replaced"] == synthetic > 0
    assert stats["requested"] >= stats["replaced"] and stats["shortfall"] == stats["requested"] - stats["replaced"]
