"""Evaluation of a classifier on a split: top-1/top-5, class-balanced and per-class accuracy,
many/medium/few-shot accuracy on long-tail data, per-group and worst-group accuracy.

Papers and timm report top-1 over images (micro); ``balanced_top1`` is the mean of
per-class accuracies, what long-tail and few-shot studies compare. Rank 0 evaluates
on the whole split alone, so nothing here synchronises across ranks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def shot_groups(train_counts: Sequence[int], many: int = 20, few: int = 5) -> dict[str, np.ndarray]:
    """Classes by training images: many (> ``many``), medium, few (< ``few``); the defaults are
    CUB-LT's thresholds, Flower-LT's are 30 and 10."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts > many),
        "medium": np.flatnonzero((counts <= many) & (counts >= few)),
        "few": np.flatnonzero(counts < few),
    }


def group_accuracy(correct: np.ndarray, groups: list) -> dict:
    """Accuracy within each group; ``correct`` and ``groups`` in the loader's (unshuffled) order."""
    groups = np.asarray(groups)
    return {str(g): float(correct[groups == g].mean()) for g in sorted(set(groups.tolist()))}


def evaluate(model: torch.nn.Module, loader, device: torch.device, num_classes: int,
             amp_dtype: Optional[torch.dtype] = None, train_counts: Optional[Sequence[int]] = None,
             shot_thresholds: tuple[int, int] = (20, 5)) -> dict:
    """Accuracy of ``model`` on the images of ``loader`` (unshuffled, over an ``onlinemix.data.SplitImages``).

    Returns:
        ``images``, ``top1``, ``top5``, ``balanced_top1`` and ``per_class``; ``many``,
        ``medium`` and ``few`` with ``train_counts`` (``shot_thresholds`` = MANY, FEW);
        ``groups`` and ``worst_group`` when the split defines groups.
    """
    from torchmetrics.classification import MulticlassAccuracy

    local = dict(num_classes=num_classes, sync_on_compute=False)
    top1 = MulticlassAccuracy(top_k=1, average="micro", **local).to(device)
    top5 = MulticlassAccuracy(top_k=min(5, num_classes), average="micro", **local).to(device)
    per_class = MulticlassAccuracy(average="none", **local).to(device)
    correct, seen = [], torch.zeros(num_classes, dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x).float()
            for metric in (top1, top5, per_class):
                metric.update(logits, y)
            correct.append((logits.argmax(1) == y).cpu())
            seen[y.cpu()] = True
    accuracy = per_class.compute().cpu()
    result = {"images": int(sum(len(c) for c in correct)), "top1": float(top1.compute()), "top5": float(top5.compute()),
              "balanced_top1": float(accuracy[seen].mean()), "per_class": [round(float(v), 4) for v in accuracy]}
    if train_counts is not None:
        many, few = shot_thresholds
        for group, classes in shot_groups(train_counts, many=many, few=few).items():
            classes = [c for c in classes if seen[c]]
            if classes:
                result[group] = float(accuracy[classes].mean())
    groups = loader.dataset.split.groups
    if groups is not None:
        result["groups"] = group_accuracy(torch.cat(correct).numpy(), groups)
        result["worst_group"] = min(result["groups"].values())
    return result
