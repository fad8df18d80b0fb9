"""DiffMix: swap synthetic Diff-Mix samples into a batch, then Mixup/CutMix, with soft targets.

``DiffMix`` is a drop-in for ``timm.data.Mixup``; ``DiffMixCollate`` is the one
for ``timm.data.FastCollateMixup`` (timm's prefetcher path). Per call:

1. each sample is, independently with probability ``p``, replaced by a
   synthetic one taken from a ``SampleSource``; its label is computed from its
   metadata as ``(1 - s^γ)·onehot(source) + s^γ·onehot(target)``;
2. Mixup/CutMix with timm's semantics and random stream (modes ``batch``,
   ``pair``, ``elem``), mixing the *soft* labels of paired samples, so a CutMix
   box may carry a synthetic image;
3. label smoothing with timm's formula.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from timm.data import FastCollateMixup, Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.mixup import cutmix_bbox_and_lam
from torch.utils.data import default_collate

from .crop import RandomResizedCropFlip, resize_images
from .labels import Lam, as_soft_targets, mix_labels, smooth_labels, translation_label
from .batch import SampleBatch, SampleSource, SyntheticRows

SyntheticTransform = Callable[[torch.Tensor], torch.Tensor]


class ReplacementCounts:
    """Samples seen, chosen for replacement and replaced, summed over every process a transform runs in.

    A collate function runs in the DataLoader's worker processes, each on its own copy
    of the transform, so plain attributes would count where nobody reads them. The
    counts live in one shared-memory tensor that forked and spawned workers share with
    the training process, one row per process (the training process, then each worker
    by its id) because ``+=`` on shared memory is not atomic across processes.
    """

    MAX_WORKERS = 256
    SAMPLES, REQUESTED, REPLACED = range(3)

    def __init__(self):
        self._rows = torch.zeros(1 + self.MAX_WORKERS, 3, dtype=torch.int64).share_memory_()

    def add(self, column: int, count: int) -> None:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.id >= self.MAX_WORKERS:
            raise ValueError(
                f"DiffMix counts its replacements for at most {self.MAX_WORKERS} DataLoader workers, "
                f"this is worker {info.id}; use fewer num_workers."
            )
        self._rows[0 if info is None else 1 + info.id, column] += count

    def totals(self) -> tuple[int, int, int]:
        """``(samples, requested, replaced)`` over all processes."""
        samples, requested, replaced = (int(v) for v in self._rows.sum(0))
        return samples, requested, replaced


def blend(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam·a + (1 - lam)·b`` in the dtype of ``a``; uint8 pixels are rounded as timm's collate does."""
    if a.dtype == torch.uint8:
        return (a.float() * lam + b.float() * (1 - lam)).round_().to(torch.uint8)
    return a * lam + b * (1 - lam)


class DiffMix(Mixup):
    """Online Diff-Mix replacement followed by Mixup/CutMix; a drop-in for ``timm.data.Mixup``.

    The positional and keyword arguments before ``p`` are ``timm.data.Mixup``'s,
    with its meaning, so ``DiffMix(**mixup_args, source=ring, p=0.1)`` works where
    timm builds ``Mixup(**mixup_args)``. Unlike timm, ``mixup_alpha`` and
    ``cutmix_alpha`` default to 0: plain Diff-Mix unless Mixup or CutMix is asked
    for. ``prob`` stays the probability of applying Mixup/CutMix (per batch, or
    per sample in ``elem``/``pair`` modes) and is independent of ``p``.

    Args:
        mixup_alpha: Mixup beta-distribution alpha; Mixup is active if > 0.
        cutmix_alpha: CutMix beta-distribution alpha; CutMix is active if > 0.
        cutmix_minmax: CutMix box min/max ratio of the image side; activates CutMix.
        prob: Probability of applying Mixup/CutMix per batch or per element.
        switch_prob: Probability of CutMix instead of Mixup when both are active.
        mode: ``'batch'``, ``'pair'`` or ``'elem'``, as in timm.
        correct_lam: Correct CutMix's lambda to the clipped box area.
        label_smoothing: Smoothing ``ε`` applied last: ``y·(1 - ε) + ε / C``.
        num_classes: Number of classes ``C``.
        multi_label: Accepted for timm compatibility; must be False.
        p: Probability that a sample is replaced by a synthetic one (the paper
            uses 0.1 all-shot, 0.3 5-shot, 0.5 long-tail).
        gamma: ``γ`` of the translation label ``s^γ`` (0.5 all-shot, 0.1-0.3 few-shot).
        source: Where synthetic samples come from (a ``SampleSource``); needed when ``p > 0``.
        mean: Per-channel mean (0-1 scale) used to normalise synthetic images for
            floating-point batches; must match the real images' normalisation.
        std: Per-channel standard deviation, likewise.
        synthetic_transform: Applied to the synthetic uint8 images ``[K, 3, h, w]``
            on the batch's device before they are resized to the batch's ``H×W``;
            must return uint8 ``[K, 3, h', w']``. Default: timm's training crop and
            flip (``RandomResizedCropFlip()``); give it the crop your real images get.
            ``None`` applies none.

    Call:
        ``x``: floating-point ``[B, 3, H, W]`` normalised with ``mean``/``std``, or
        uint8 ``[B, 3, H, W]`` raw pixels (then synthetic images stay raw pixels),
        on any device; it is modified in place and keeps its dtype.
        ``target``: int64 ``[B]`` or soft ``[B, C]``. Returns ``(x, soft_target)``
        with ``soft_target`` float32 ``[B, C]`` on ``target.device``, rows summing to 1.
        Afterwards ``synthetic`` says which rows were replaced (``SyntheticRows``, or
        None), for ``FidelityMonitor``.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: Optional[Sequence[float]] = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        multi_label: bool = False,
        *,
        p: float = 0.1,
        gamma: float = 0.5,
        source: Optional[SampleSource] = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        synthetic_transform: Optional[SyntheticTransform] = RandomResizedCropFlip(),
    ):
        self.check_inputs(
            mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, label_smoothing,
            num_classes, multi_label, p, gamma, source, mean, std, synthetic_transform,
        )
        super().__init__(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax, prob=prob,
            switch_prob=switch_prob, mode=mode, correct_lam=correct_lam, label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self.multi_label = False
        self.p = float(p)
        self.gamma = float(gamma)
        self.source = source
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.synthetic_transform = synthetic_transform
        self.counts = ReplacementCounts()
        self.recent = None  # (uint8 images, unsmoothed labels) of the last call's replacement, for sample grids
        self.synthetic = None  # the last call's SyntheticRows, or None when it replaced nothing

    @staticmethod
    def check_inputs(
        mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, label_smoothing,
        num_classes, multi_label, p, gamma, source, mean, std, synthetic_transform,
    ) -> None:
        """Raise a ``ValueError`` that says what to change for any bad option."""
        for name, value in (("prob", prob), ("switch_prob", switch_prob), ("p", p)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability and must lie in [0, 1], got {value}.")
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha), ("gamma", gamma)):
            if not 0.0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if cutmix_minmax is not None and not (
            len(cutmix_minmax) == 2 and 0.0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1.0
        ):
            raise ValueError(
                f"cutmix_minmax must be two ratios 0 < min < max <= 1 of the image side, got {cutmix_minmax}."
            )
        if mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mode must be 'batch', 'pair' or 'elem', got {mode!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}.")
        if multi_label:
            raise ValueError("DiffMix labels single-label classification; multi_label=True is not supported.")
        if p > 0 and source is None:
            raise ValueError(
                f"p={p} asks for synthetic samples but no source was given; pass source= "
                "(a SampleRing, ReplaySource or TensorSource) or set p=0."
            )
        if source is not None and not isinstance(source, SampleSource):
            raise ValueError(f"source must have a take(n) method returning a SampleBatch, got {type(source).__name__}.")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 per-channel values with std > 0, got {mean} and {std}.")
        if synthetic_transform is not None and not callable(synthetic_transform):
            raise ValueError(f"synthetic_transform must be callable or None, got {type(synthetic_transform).__name__}.")

    def stats(self) -> dict:
        """Counts since construction, over this process and the DataLoader workers it runs in.

        Of ``samples`` seen with mixing enabled, ``requested`` were chosen for
        replacement, ``replaced`` got a synthetic sample and ``shortfall`` stayed
        real because the source ran short.
        """
        samples, requested, replaced = self.counts.totals()
        return {
            "samples": samples,
            "requested": requested,
            "replaced": replaced,
            "shortfall": requested - replaced,
            "replaced_fraction": replaced / samples if samples else 0.0,
        }

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_batch(x, target)
        self.synthetic = self.recent = None
        rows = as_soft_targets(target, self.num_classes)
        if self.mixup_enabled:
            self.counts.add(ReplacementCounts.SAMPLES, x.shape[0])
            if self.p > 0:
                self._replace(x, rows)
            if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
                rows = mix_labels(rows, self._mix(x))
        return x, smooth_labels(rows, self.label_smoothing)

    def _check_batch(self, x: torch.Tensor, target: torch.Tensor) -> None:
        if x.ndim != 4 or not (x.dtype.is_floating_point or x.dtype == torch.uint8):
            raise ValueError(
                f"x must be a float or uint8 image batch [B, C, H, W], got a {x.dtype} tensor of "
                f"shape {tuple(x.shape)}."
            )
        if target.shape[0] != x.shape[0]:
            raise ValueError(f"x holds {x.shape[0]} images but target holds {target.shape[0]} labels.")
        if self.p > 0 and x.shape[1] != 3:
            raise ValueError(f"Synthetic images are RGB, so x must have 3 channels, got {x.shape[1]}.")
        if self.mode == "pair" and x.shape[0] % 2:
            raise ValueError(
                f"mode='pair' needs an even batch, got {x.shape[0]}; use drop_last=True in the "
                "DataLoader (as timm does for training) or mode='batch' / 'elem'."
            )

    def _replace(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        chosen = np.flatnonzero(np.random.rand(x.shape[0]) < self.p)
        self.counts.add(ReplacementCounts.REQUESTED, len(chosen))
        if len(chosen) == 0:
            return
        batch = self.source.take(len(chosen))
        if not isinstance(batch, SampleBatch) or len(batch) > len(chosen):
            raise ValueError(
                f"source.take({len(chosen)}) must return a SampleBatch of at most {len(chosen)} samples, "
                f"got {type(batch).__name__} of length {len(batch) if isinstance(batch, SampleBatch) else '?'}."
            )
        k = len(batch)
        self.counts.add(ReplacementCounts.REPLACED, k)
        if k == 0:
            return
        top = int(torch.maximum(batch.source.max(), batch.target.max()))
        if top >= self.num_classes:
            raise ValueError(
                f"The source returned class index {top} but num_classes={self.num_classes}; the "
                "generator and the classifier must use the same class list."
            )
        index = torch.from_numpy(chosen[:k])
        x[index.to(x.device)] = self._prepare(batch.images, x)
        labels = translation_label(batch.source, batch.target, batch.strength, self.gamma, self.num_classes)
        rows[index.to(rows.device)] = labels.to(rows.device)
        self.recent = (batch.images, labels)
        self.synthetic = SyntheticRows(index, batch.source, batch.target, batch.strength, batch.first_read)

    def _prepare(self, images: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """uint8 synthetic images -> the batch's device, size, normalisation and dtype."""
        images = images.to(x.device, non_blocking=True)
        if self.synthetic_transform is not None:
            images = self.synthetic_transform(images)
            if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
                    and images.ndim == 4 and images.shape[1] == 3):
                raise ValueError("synthetic_transform must return uint8 images [K, 3, H, W].")
        if tuple(images.shape[-2:]) != tuple(x.shape[-2:]):
            images = resize_images(images, tuple(x.shape[-2:]))
        if x.dtype == torch.uint8:
            return images
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return images.float().div_(255).sub_(mean).div_(std).to(x.dtype)

    def _mix(self, x: torch.Tensor) -> Lam:
        """Mixup/CutMix ``x`` in place with timm's random stream; returns each sample's own share."""
        if self.mode == "batch":
            return self._mix_batch(x)
        batch_size = x.shape[0]
        pairs = batch_size // 2 if self.mode == "pair" else batch_size
        lam_batch, use_cutmix = self._params_per_elem(pairs)
        x_orig = x.clone()  # every partner must be read before it is mixed
        for i in range(pairs):
            j = batch_size - 1 - i
            lam = lam_batch[i]
            if lam == 1.0:
                continue
            partners = ((i, j), (j, i)) if self.mode == "pair" else ((i, j),)
            if use_cutmix[i]:
                (yl, yh, xl, xh), lam_batch[i] = cutmix_bbox_and_lam(
                    x[i].shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
                for a, b in partners:
                    x[a, :, yl:yh, xl:xh] = x_orig[b, :, yl:yh, xl:xh]
            else:
                for a, b in partners:
                    x[a] = blend(x[a], x_orig[b], lam)
        if self.mode == "pair":
            lam_batch = np.concatenate((lam_batch, lam_batch[::-1]))
        return torch.from_numpy(np.ascontiguousarray(lam_batch, dtype=np.float32)).unsqueeze(1)

    def _mix_batch(self, x: torch.Tensor) -> float:
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.0:
            return 1.0
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                x.shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
            # Flipping only the box copies far less than timm's x.flip(0)[box].
            x[:, :, yl:yh, xl:xh] = x[:, :, yl:yh, xl:xh].flip(0)
        elif x.dtype == torch.uint8:
            x.copy_(blend(x, x.flip(0), lam))
        else:
            flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(flipped)
        return float(lam)


class DiffMixCollate(DiffMix, FastCollateMixup):
    """``DiffMix`` as a collate function for timm's prefetcher path.

    Subclasses ``timm.data.FastCollateMixup`` so ``PrefetchLoader.mixup_enabled``
    (and with it timm's ``--mixup-off-epoch``) reaches it. Takes the list of
    ``(uint8 CHW image, label)`` samples that timm's prefetcher transforms produce
    (NumPy arrays or tensors), and returns uint8 ``[B, 3, H, W]`` and float32
    ``[B, C]`` targets; synthetic images stay raw pixels, and ``PrefetchLoader``
    normalises the whole batch on the device. Accepts the same arguments as ``DiffMix``.

    ``stats()`` counts over the DataLoader's workers too. ``synthetic`` and ``recent``
    describe the last batch collated in the process that asks, which is a worker when
    ``num_workers > 0``, so the training process cannot pair them with its logits; for
    ``FidelityMonitor`` and sample grids use ``DiffMix`` on the collated batch instead.
    """

    def __call__(self, batch, _=None) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([torch.as_tensor(sample[0]) for sample in batch])
        if images.dtype != torch.uint8:
            raise ValueError(
                f"DiffMixCollate expects uint8 images (timm's prefetcher transforms), got {images.dtype}; "
                "for normalised float images use DiffMix on the collated batch instead."
            )
        target = default_collate([sample[1] for sample in batch])
        return super().__call__(images, target)
