"""``SampleBatch``, the unit every source, producer and ring exchanges; the ``SampleSource`` and
``Producer`` protocols; ``SyntheticRows``, what ``DiffMix`` tells the trainer about the rows it replaced.

Kept free of image-file and process machinery (PIL, csv, shared memory) so that the
ring, the pool and a generator worker import only what they use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SampleBatch:
    """``K`` synthetic samples and their metadata, all on the CPU.

    Attributes:
        images: uint8 ``[K, 3, H, W]``, RGB, not normalised.
        source: int64 ``[K]``, class of the reference image that was translated.
        target: int64 ``[K]``, class named in the prompt.
        strength: float32 ``[K]``, SDEdit strength in ``[0, 1]`` (1 for text-to-image).
        first_read: bool ``[K]``, whether this read is the sample's first (by any consumer of a
            ring); None when the source does not know.
    """

    images: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    strength: torch.Tensor
    first_read: Optional[torch.Tensor] = None

    def __post_init__(self):
        images = self.images
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                "SampleBatch.images must be uint8 RGB images [K, 3, H, W], got a "
                f"{images.dtype} tensor of shape {tuple(images.shape)}; convert float images "
                "in [0, 1] with (images * 255).round().to(torch.uint8)."
            )
        k = images.shape[0]
        for name in ("source", "target", "strength"):
            value = getattr(self, name)
            if value.ndim != 1 or value.shape[0] != k:
                raise ValueError(
                    f"SampleBatch.{name} must have shape [{k}] to match {k} images, "
                    f"got {tuple(value.shape)}."
                )
        for name in ("source", "target"):
            value = getattr(self, name)
            if value.dtype.is_floating_point or value.dtype == torch.bool:
                raise ValueError(f"SampleBatch.{name} must hold integer class indices, got {value.dtype}.")
            if k and int(value.min()) < 0:
                raise ValueError(f"SampleBatch.{name} holds a negative class index ({int(value.min())}).")
        if self.first_read is not None and (self.first_read.dtype != torch.bool or self.first_read.shape != (k,)):
            raise ValueError(f"SampleBatch.first_read must be a bool tensor of shape [{k}], got a "
                             f"{self.first_read.dtype} tensor of shape {tuple(self.first_read.shape)}.")
        if not self.strength.dtype.is_floating_point:
            raise ValueError(f"SampleBatch.strength must be floating point, got {self.strength.dtype}.")
        if k:
            low, high = (float(v) for v in torch.aminmax(self.strength))
            if not (0.0 <= low and high <= 1.0):  # also rejects NaN
                raise ValueError(
                    "SampleBatch.strength must lie in [0, 1] (the SDEdit strength s, 1 for "
                    f"text-to-image), got values from {low} to {high}."
                )

    def __len__(self) -> int:
        return self.images.shape[0]

    def select(self, index: torch.Tensor) -> "SampleBatch":
        """The samples at ``index`` (integer ``[K']``), in that order."""
        first_read = None if self.first_read is None else self.first_read[index]
        return SampleBatch(self.images[index], self.source[index], self.target[index], self.strength[index],
                           first_read)


@runtime_checkable
class SampleSource(Protocol):
    """Anything that hands out synthetic samples.

    ``take(n)`` returns a ``SampleBatch`` of ``k <= n`` samples and never blocks:
    when fewer than ``n`` samples are ready it returns what it has, possibly none.
    Randomness comes from NumPy's global generator, which timm seeds per rank
    and per DataLoader worker.
    """

    def take(self, n: int) -> SampleBatch:
        ...


@runtime_checkable
class Producer(Protocol):
    """What a ``GeneratorPool`` worker runs: ``producer()`` returns the next ``SampleBatch``.

    A worker builds its producer once with ``factory(device)`` (a picklable
    ``ProducerFactory``), then calls it batch after batch. ``dropped`` is the running
    count of samples the producer made but did not return (non-finite, filtered); the
    pool reads it after every batch and reports it in ``GeneratorPool.stats()``.
    """

    dropped: int

    def __call__(self) -> SampleBatch:
        ...


ProducerFactory = Callable[[str], Producer]


class SyntheticRows(NamedTuple):
    """Which rows of the last batch ``DiffMix`` replaced, and what each synthetic sample is (all on the CPU).

    Attributes:
        rows: int64 ``[K]``, row indices in the batch.
        source: int64 ``[K]``, class of the reference image.
        target: int64 ``[K]``, class the prompt asked for.
        strength: float32 ``[K]``, SDEdit strength (1 for text-to-image).
        first_read: bool ``[K]``, whether the classifier sees the sample for the first time
            (``SampleBatch.first_read``); None when the source does not know.
    """

    rows: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    strength: torch.Tensor
    first_read: Optional[torch.Tensor] = None
