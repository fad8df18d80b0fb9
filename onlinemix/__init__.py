"""onlinemix: Diff-Mix diffusion augmentation generated online, during training.

The names below are imported on first use (PEP 562): a generator worker or a
DataLoader worker that only attaches to the ring imports ``onlinemix.ring`` and
what it needs, not timm, diffusers or transformers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOMES = {
    "DiffMix": "transform",
    "DiffMixCollate": "transform",
    "FidelityMonitor": "fidelity",
    "GeneratorPool": "pool",
    "RandomResizedCropFlip": "crop",
    "Producer": "batch",
    "ProducerFactory": "batch",
    "ReplayProducerFactory": "sources",
    "ReplaySource": "sources",
    "SampleBatch": "batch",
    "SampleRecorder": "sources",
    "SampleRing": "ring",
    "SampleSource": "batch",
    "SyntheticRows": "batch",
    "TensorSource": "sources",
    "mix_labels": "labels",
    "one_hot": "labels",
    "smooth_labels": "labels",
    "translation_label": "labels",
}

__all__ = sorted(_HOMES)
__version__ = "0.1.0.dev0"

if TYPE_CHECKING:
    from .batch import Producer, ProducerFactory, SampleBatch, SampleSource, SyntheticRows
    from .fidelity import FidelityMonitor
    from .labels import mix_labels, one_hot, smooth_labels, translation_label
    from .pool import GeneratorPool
    from .ring import SampleRing
    from .sources import ReplayProducerFactory, ReplaySource, SampleRecorder, TensorSource
    from .crop import RandomResizedCropFlip
    from .transform import DiffMix, DiffMixCollate


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'onlinemix' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
