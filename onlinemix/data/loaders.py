"""The classifier's side of the data: timm's transforms with the model's normalisation, and the loaders
of a run's splits across the processes of a multi-process run."""
from __future__ import annotations

import torch

from . import SplitImages

# RandomResizedCrop's area range for real training images; synthetic images get the same crop.
TRAIN_CROP_SCALE = (0.35, 1.0)


def normalisation(model) -> tuple:
    """The mean and std the model's pretrained weights expect (timm's pretrained config; ImageNet's by default)."""
    from timm.data import resolve_data_config

    config = resolve_data_config(model=model)
    return tuple(config["mean"]), tuple(config["std"])


def transforms(img_size: int, mean, std) -> tuple:
    """timm's training transform (random resized crop over ``TRAIN_CROP_SCALE``, flip, no colour jitter)
    and its evaluation transform (resize to ``img_size / 0.875``, centre crop)."""
    from timm.data import create_transform

    common = dict(input_size=img_size, interpolation="bilinear", mean=mean, std=std)
    training = create_transform(**common, is_training=True, scale=TRAIN_CROP_SCALE, hflip=0.5, color_jitter=None)
    evaluation = create_transform(**common, crop_pct=0.875)
    return training, evaluation


def loaders(splits, state, mean, std, *, img_size: int, batch_size: int, workers: int, seed: int) -> tuple:
    """The training loader with its ``DistributedSampler`` (one share of the images per process of
    accelerate's ``state``), and an evaluation loader per non-empty split (val, test, test_<name>).

    Returns:
        ``(train_loader, sampler, {split name: loader})``; call ``sampler.set_epoch`` every epoch.
    """
    training, evaluation = transforms(img_size, mean, std)
    common = dict(num_workers=workers, persistent_workers=workers > 0)
    train_set = SplitImages(splits.train, training)
    # Seeded and reset per epoch with set_epoch: the same order whether a run was resumed or not.
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=state.num_processes,
                                                  rank=state.process_index, shuffle=True, seed=seed)
    per_rank = len(splits.train) // state.num_processes
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler,
                                               drop_last=per_rank > batch_size, **common)
    evaluate = {name: torch.utils.data.DataLoader(SplitImages(split, evaluation), batch_size=batch_size, **common)
                for name, split in {"val": splits.val, **splits.tests}.items() if len(split)}
    return train_loader, sampler, evaluate
