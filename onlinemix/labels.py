"""Label maths for Diff-Mix: one-hot rows, translation labels, mixing and smoothing.

Every function here is pure and batched: it takes tensors with a leading batch
dimension and returns float32 rows of length ``num_classes`` on the device of
its inputs. A row of a *soft target* is a probability vector (non-negative,
summing to 1); every function maps soft targets to soft targets.
"""
from __future__ import annotations

import math
from typing import Union

import torch

Lam = Union[float, torch.Tensor]


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot rows for integer class labels.

    Args:
        labels: Integer labels ``[B]`` in ``[0, num_classes)``.
        num_classes: Number of classes ``C``.

    Returns:
        float32 ``[B, C]`` on ``labels.device``.
    """
    rows = torch.zeros(labels.shape[0], num_classes, dtype=torch.float32, device=labels.device)
    return rows.scatter_(1, labels.long().view(-1, 1), 1.0)


def translation_weight(strength: torch.Tensor, gamma: float) -> torch.Tensor:
    """The share ``s^γ`` of a translated image's label that goes to the prompt's class."""
    return strength.to(torch.float32).pow(gamma)


def translation_label(
    source: torch.Tensor,
    target: torch.Tensor,
    strength: torch.Tensor,
    gamma: float,
    num_classes: int,
) -> torch.Tensor:
    """Soft label of an image of class ``source`` translated toward class ``target``.

    Diff-Mix (Eq. 3 of the paper) labels an SDEdit translation of strength ``s``
    as ``(1 - s^γ)·onehot(source) + s^γ·onehot(target)``: the class named in the
    prompt gets ``s^γ``, the reference image's class keeps the rest (Table 6's
    reading: γ = 0.1, s = 0.7 gives the target 0.96). With
    ``source == target`` (Diff-Aug, Diff-Gen) the row is one-hot.

    Args:
        source: Class of the reference image, integer ``[K]``.
        target: Class of the prompt, integer ``[K]``.
        strength: SDEdit strength ``s`` in ``[0, 1]``, float ``[K]``.
        gamma: Non-linearity ``γ >= 0``; small values give the prompt's class more
            weight (the paper uses 0.5 all-shot, 0.1 to 0.3 few-shot).
        num_classes: Number of classes ``C``.

    Returns:
        float32 ``[K, C]`` on ``source.device``, rows summing to 1.

    Raises:
        ValueError: ``gamma`` is not finite and >= 0, or a strength lies outside ``[0, 1]``.
    """
    if not 0.0 <= gamma < math.inf:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}.")
    if strength.numel() and not bool(((strength >= 0) & (strength <= 1)).all()):  # NaN fails too
        raise ValueError(f"strength must lie in [0, 1], got values from {float(strength.min())} to "
                         f"{float(strength.max())}; a label weight outside [0, 1] is no probability.")
    weight = translation_weight(strength.to(source.device), gamma).view(-1, 1)
    rows = torch.zeros(source.shape[0], num_classes, dtype=torch.float32, device=source.device)
    rows.scatter_add_(1, source.long().view(-1, 1), 1.0 - weight)
    rows.scatter_add_(1, target.long().view(-1, 1).to(source.device), weight)
    return rows


def mix_labels(rows: torch.Tensor, lam: Lam) -> torch.Tensor:
    """Mixup/CutMix labels: ``lam·rows + (1 - lam)·rows.flip(0)``.

    The partner of sample ``i`` is sample ``B - 1 - i``, timm's pairing.

    Args:
        rows: Soft targets ``[B, C]``.
        lam: Share of each sample's own label, a float for the whole batch or a
            tensor ``[B, 1]`` per sample.
    """
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=rows.device, dtype=rows.dtype)
    return rows * lam + rows.flip(0) * (1.0 - lam)


def smooth_labels(rows: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing with timm's formula: ``rows·(1 - ε) + ε / C``.

    On a one-hot row this gives timm's ``on = 1 - ε + ε/C`` and ``off = ε/C``.
    """
    if smoothing == 0.0:
        return rows
    return rows * (1.0 - smoothing) + smoothing / rows.shape[1]


def as_soft_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Check class targets and return them as float32 soft targets ``[B, C]``.

    Args:
        target: Integer labels ``[B]`` or soft targets ``[B, C]``.
        num_classes: Number of classes ``C``.

    Raises:
        ValueError: if the shape, dtype or values do not describe ``B`` samples of
            ``num_classes`` classes.
    """
    if target.ndim == 1:
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
            raise ValueError(
                f"Integer class targets must have an integer dtype, got {target.dtype}; "
                "pass int64 labels [B] or soft targets [B, num_classes]."
            )
        if target.numel() and bool(((target < 0) | (target >= num_classes)).any()):
            raise ValueError(
                f"Class targets must lie in [0, {num_classes}), got values from "
                f"{int(target.min())} to {int(target.max())}; check num_classes={num_classes} "
                "against the data set's class count."
            )
        return one_hot(target, num_classes)
    if target.ndim == 2 and target.shape[1] == num_classes and target.dtype.is_floating_point:
        return target.to(torch.float32)
    raise ValueError(
        f"Targets must be int64 labels [B] or float soft targets [B, {num_classes}], got a "
        f"{target.dtype} tensor of shape {tuple(target.shape)}."
    )
