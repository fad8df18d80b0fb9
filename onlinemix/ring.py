"""SampleRing: a lock-free shared-memory ring of synthetic samples between processes.

One segment in ``/dev/shm`` holds ``slots`` uint8 images ``[3, H, W]`` with their
metadata (reference class, prompt class, strength, sequence number, write time,
writer pid) and the bookkeeping of every producer and consumer. The training
process creates it; generator workers attach as producers, DataLoader workers and
other ranks on the node as consumers.

Protocol (a seqlock per slot; it needs no lock):

- Slot ``s`` belongs to producer ``s % producers``: one writer per slot. A writer
  makes the slot's version odd, writes pixels and metadata, then makes it even.
- A reader snapshots versions, picks published slots, *copies* them, and keeps a
  copy only if the slot's version did not move meanwhile; otherwise it retries
  (bounded). It never hands out a view into the segment.
- Every consumer counts its own reads per slot (one writer per counter), so the
  reuse bound needs no lock either; the price is that ``C`` consumers racing for
  the same sample can read it up to ``max_reuse + C - 1`` times.
- A fresh-supply limit (``set_fresh_limit``, a header word any process may set) caps
  the samples all producers write in all; producer ``i`` owns its share of it, so
  producers never race for the remainder (a dead producer's share stays unmade).

Memory ordering relies on x86's total store order, where the writes above are seen
in program order by other cores; weaker architectures (aarch64) are untested.

The ring is one module because the writer's and the reader's halves of the seqlock, and
the read counts both consult for reuse, are only correct read together; the segment's
lifecycle (creation, unlinking, stale sweeps, liveness) lives in ``onlinemix.segments``.
"""
from __future__ import annotations

import fcntl
import os
import time
import uuid
from multiprocessing import shared_memory
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .batch import SampleBatch
from .segments import HEADER_WORDS, LAYOUT_WORD, PREFIX, RING_MAGIC, SHM_DIR, SharedSegment, alive, start_ticks

_LAYOUT_VERSION = 2
_ALIGN = 64
_MAX_RETRIES = 8
_POLL_S = 0.0005
# Header words after the layout version (the magic number and the owner are onlinemix.segments').
_H_SLOTS, _H_HEIGHT, _H_WIDTH, _H_PRODUCERS, _H_CONSUMERS, _H_MAX_REUSE = range(LAYOUT_WORD + 1, LAYOUT_WORD + 7)
_H_FRESH_LIMIT = 10  # after the owner's words; -1: no limit
# Columns of the per-consumer statistics.
_C_READS, _C_FRESH, _C_AGE_SUM, _C_RETRIES, _C_SHORTFALL, _C_TAKES = range(6)
# Columns of the per-producer statistics.
_P_COUNTER, _P_WRITTEN, _P_WAITS, _P_PID = range(4)


def _layout(slots: int, height: int, width: int, producers: int, consumers: int, bins: int):
    """Byte offsets of every array in the segment, 64-byte aligned."""
    fields = [
        ("header", np.int64, (HEADER_WORDS,)),
        ("version", np.uint64, (slots,)),
        ("seq", np.int64, (slots,)),
        ("write_time", np.float64, (slots,)),
        ("source", np.int64, (slots,)),
        ("target", np.int64, (slots,)),
        ("strength", np.float64, (slots,)),
        ("writer", np.int64, (slots,)),
        ("reads", np.int64, (consumers, slots)),
        ("reads_seq", np.int64, (consumers, slots)),
        ("consumer_stats", np.float64, (consumers, 6)),
        ("consumer_owner", np.int64, (consumers, 2)),
        ("producer_stats", np.int64, (producers, 4)),
        ("evicted_reads", np.int64, (producers, bins)),
        ("images", np.uint8, (slots, 3, height, width)),
    ]
    offsets, offset = {}, 0
    for name, dtype, shape in fields:
        offsets[name] = (offset, dtype, shape)
        offset += int(np.prod(shape)) * np.dtype(dtype).itemsize
        offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets, offset


def _bins(max_reuse: int, consumers: int) -> int:
    """Bins of the reads-per-sample histogram: 0 .. max_reuse + consumers - 1, capped at 64."""
    return min(max_reuse + consumers, 64)


class SampleRing(SharedSegment):
    """A shared-memory ring of synthetic samples; a ``SampleSource`` for ``DiffMix``.

    Create it with ``SampleRing.create`` in the owning (training) process and attach
    with ``SampleRing.attach`` anywhere else. A ring pickles as its name, so it can be
    passed to spawned processes and DataLoader workers; a consumer attaches lazily,
    once per process, and claims a free consumer index.
    """

    KIND, MAGIC, LAYOUT = "SampleRing", RING_MAGIC, _LAYOUT_VERSION

    def __init__(self, name: str, role: str = "consumer", index: Optional[int] = None):
        if role not in ("producer", "consumer"):
            raise ValueError(f"role must be 'producer' or 'consumer', got {role!r}.")
        super().__init__(name)
        self.role = role
        self._requested_index = index
        self.index: Optional[int] = None

    # -- construction -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        slots: int,
        image_size: Union[int, Sequence[int]],
        *,
        producers: int,
        consumers: int,
        max_reuse: int = 4,
        name: Optional[str] = None,
    ) -> "SampleRing":
        """Create a ring in ``/dev/shm``; the calling process owns it and unlinks it on close.

        Args:
            slots: Number of samples the ring holds (at least ``producers``).
            image_size: ``int`` for square images or ``(height, width)``.
            producers: Number of producer indices (generator workers).
            consumers: Number of consumer indices (every process that reads:
                training ranks, DataLoader workers).
            max_reuse: How many times one sample may be read (see the module notes
                on how tight this is with several consumers).
            name: Segment name; default a fresh ``onlinemix-...`` name.

        Raises:
            ValueError: for bad sizes, or when ``/dev/shm`` lacks the space.
        """
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for label, value in (("slots", slots), ("producers", producers), ("consumers", consumers),
                             ("max_reuse", max_reuse), ("height", height), ("width", width)):
            if int(value) != value or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value}.")
        if slots < producers:
            raise ValueError(f"slots ({slots}) must be at least producers ({producers}): each producer owns slots.")
        offsets, size = _layout(slots, height, width, producers, consumers, _bins(max_reuse, consumers))
        name = name or f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        shm = cls._new_segment(name, size, lambda available: _space_message(size, available, slots, height, width),
                               {_H_SLOTS: slots, _H_HEIGHT: height, _H_WIDTH: width, _H_PRODUCERS: producers,
                                _H_CONSUMERS: consumers, _H_MAX_REUSE: max_reuse, _H_FRESH_LIMIT: -1})
        ring = cls(name, "consumer", None)
        ring._own(shm)
        ring._seq[:] = -1
        return ring

    @classmethod
    def attach(cls, name: str, role: str = "consumer", index: Optional[int] = None) -> "SampleRing":
        """Attach to an existing ring by name.

        Args:
            name: The ring's ``name``.
            role: ``'producer'`` (may ``put``) or ``'consumer'`` (may ``take``).
            index: Producer index in ``[0, producers)`` (required for producers), or
                consumer index in ``[0, consumers)``; ``None`` claims a free one.
        """
        ring = cls(name, role, index)
        ring._ensure_attached()
        return ring

    def __reduce__(self):
        return (SampleRing, (self.name, self.role, self._requested_index if self.role == "producer" else None))

    def _missing_message(self) -> str:
        return (f"No SampleRing named {self.name!r}: its owner closed it or exited. Create it with "
                "SampleRing.create in the training process before starting readers and producers.")

    def _forked(self) -> None:
        super()._forked()
        self.index = None  # the parent's consumer index is not this process's

    def _views(self, shm: shared_memory.SharedMemory, header: np.ndarray) -> None:
        self.slots, height, width, self.producers, self.consumers, self.max_reuse = (
            int(v) for v in header[[_H_SLOTS, _H_HEIGHT, _H_WIDTH, _H_PRODUCERS, _H_CONSUMERS, _H_MAX_REUSE]])
        self.image_size = (height, width)
        offsets, _ = _layout(self.slots, height, width, self.producers, self.consumers,
                             _bins(self.max_reuse, self.consumers))
        for field, (offset, dtype, shape) in offsets.items():
            setattr(self, "_" + field, np.ndarray(shape, dtype, shm.buf, offset))

    def _attached(self) -> None:
        if self.role == "producer":
            self._claim_producer()
        elif self._requested_index is not None and not 0 <= self._requested_index < self.consumers:
            raise ValueError(f"consumer index must be in [0, {self.consumers}) for ring {self.name!r}, got "
                             f"{self._requested_index}; pass None to claim a free one.")

    def _claim_producer(self) -> None:
        index = self._requested_index
        if index is None or not 0 <= index < self.producers:
            raise ValueError(f"A producer needs an index in [0, {self.producers}), got {index}.")
        self.index = index
        self._producer_stats[index, _P_PID] = os.getpid()
        # A writer that died mid-write left its slot odd: reclaim it as empty.
        own = np.arange(index, self.slots, self.producers)
        torn = own[self._version[own] % 2 == 1]
        self._seq[torn] = -1
        self._version[torn] += 1

    def _claim_consumer(self) -> None:
        """Claim a consumer index, once per process, at the first read."""
        me = (os.getpid(), start_ticks(os.getpid()) or 0)
        # Claiming is rare (once per process); a file lock on the segment serialises it.
        fcntl.flock(self._shm._fd, fcntl.LOCK_EX)
        try:
            owners = self._consumer_owner
            if self._requested_index is not None:
                if not 0 <= self._requested_index < self.consumers:
                    raise ValueError(
                        f"consumer index must be in [0, {self.consumers}), got {self._requested_index}.")
                index = self._requested_index
            else:
                free = [c for c in range(self.consumers) if not alive(int(owners[c, 0]), int(owners[c, 1]))]
                if not free:
                    raise ValueError(
                        f"All {self.consumers} consumer indices of ring {self.name!r} are held by live "
                        "processes; create the ring with more consumers (one per training rank and "
                        "DataLoader worker, plus the main process)."
                    )
                index = free[0]
            owners[index] = me
        finally:
            fcntl.flock(self._shm._fd, fcntl.LOCK_UN)
        self.index = index

    # -- fresh-supply limit --------------------------------------------------------

    def set_fresh_limit(self, total: Optional[int]) -> None:
        """Let the producers write ``total`` samples in all since the ring was made (None: no limit).

        Raising it lets them go on; ``put`` writes nothing past a producer's share
        (``fresh_allowance``), and reuse (up to ``max_reuse``) serves the readers meanwhile.

        Raises:
            ValueError: for a total below 0.
        """
        if total is not None and (int(total) != total or total < 0):
            raise ValueError(f"The fresh-supply limit must be an integer >= 0 or None, got {total}.")
        self._ensure_attached()
        self._header[_H_FRESH_LIMIT] = -1 if total is None else int(total)

    def fresh_limit(self) -> Optional[int]:
        """The total ``set_fresh_limit`` set, or None."""
        self._ensure_attached()
        limit = int(self._header[_H_FRESH_LIMIT])
        return None if limit < 0 else limit

    def fresh_allowance(self) -> Optional[int]:
        """How many more samples this producer may write under the fresh-supply limit (None: no limit).

        Producer ``i`` of ``P`` owns ``L // P`` of a limit ``L``, one more when ``i < L % P``.
        """
        if self.role != "producer":
            raise ValueError("fresh_allowance() is a producer's; attach with role='producer'.")
        limit = self.fresh_limit()
        if limit is None:
            return None
        share = limit // self.producers + (self.index < limit % self.producers)
        return max(0, share - int(self._producer_stats[self.index, _P_WRITTEN]))

    # -- producer side ------------------------------------------------------------

    def put(
        self,
        images: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        strength: torch.Tensor,
        *,
        timeout: Optional[float] = None,
    ) -> int:
        """Publish samples; returns how many were written.

        Each sample goes into one of this producer's slots, preferring empty ones,
        then the most-read, then the oldest. A slot whose sample was never read is
        not overwritten: when all of this producer's slots are fresh, ``put`` waits
        for a reader, up to ``timeout`` seconds (``None``: no limit), and returns
        fewer than ``len(images)`` if time runs out. It writes no more than
        ``fresh_allowance()`` samples and returns at once when that is spent.
        """
        if self.role != "producer":
            raise ValueError("put() needs a ring attached with role='producer'.")
        self._ensure_attached()
        batch = SampleBatch(images.cpu(), source.cpu().long(), target.cpu().long(), strength.cpu().float())
        if tuple(batch.images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"Ring {self.name!r} holds {self.image_size[0]}x{self.image_size[1]} images, got "
                f"{batch.images.shape[-2]}x{batch.images.shape[-1]}; resize them before put()."
            )
        pixels = batch.images.numpy()
        deadline = None if timeout is None else time.monotonic() + timeout
        allowance = self.fresh_allowance()
        count = len(batch) if allowance is None else min(len(batch), allowance)
        for i in range(count):
            slot = self._free_slot(deadline)
            if slot is None:
                return i
            self._write(slot, pixels[i], int(batch.source[i]), int(batch.target[i]), float(batch.strength[i]))
        return count

    def _free_slot(self, deadline: Optional[float]) -> Optional[int]:
        own = np.arange(self.index, self.slots, self.producers)
        waited = False
        while True:
            seq = self._seq[own]
            empty = own[seq < 0]
            if len(empty):
                return int(empty[0])
            reads = self._total_reads(own, seq)
            if reads.max() > 0:
                # Most-read first, then oldest.
                return int(own[np.lexsort((seq, -reads))[0]])
            if not waited:
                self._producer_stats[self.index, _P_WAITS] += 1
                waited = True
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S)

    def _write(self, slot: int, pixels: np.ndarray, source: int, target: int, strength: float) -> None:
        stats = self._producer_stats[self.index]
        old_seq = int(self._seq[slot])
        if old_seq >= 0:
            evicted = int(self._total_reads(np.array([slot]), np.array([old_seq]))[0])
            bins = self._evicted_reads.shape[1]
            self._evicted_reads[self.index, min(evicted, bins - 1)] += 1
        seq = int(stats[_P_COUNTER]) * self.producers + self.index
        self._version[slot] += 1  # odd: being written
        self._images[slot] = pixels
        self._source[slot], self._target[slot], self._strength[slot] = source, target, strength
        self._writer[slot] = os.getpid()
        self._write_time[slot] = time.monotonic()
        self._seq[slot] = seq
        self._version[slot] += 1  # even: published
        stats[_P_COUNTER] += 1
        stats[_P_WRITTEN] += 1

    # -- consumer side ------------------------------------------------------------

    def _total_reads(self, slots: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """Reads of the samples now in ``slots`` (whose sequence numbers are ``seq``), over all consumers."""
        current = self._reads_seq[:, slots] == seq[None, :]
        return (self._reads[:, slots] * current).sum(0)

    def take(self, n: int, *, timeout: float = 0.0) -> SampleBatch:
        """Copy up to ``n`` samples out of the ring.

        Prefers the least-read, then the newest samples, never one read
        ``max_reuse`` times already. Returns at once with what is eligible (possibly
        nothing) unless ``timeout`` > 0, in which case it waits up to that long for
        ``n`` samples.
        """
        if self.role != "consumer":
            raise ValueError("take() needs a ring attached with role='consumer'.")
        if n < 0:
            raise ValueError(f"take() needs a count n >= 0, got {n}.")
        self._ensure_attached()
        if self.index is None:
            self._claim_consumer()
        deadline = time.monotonic() + timeout
        parts: list[tuple] = []
        taken = np.zeros(self.slots, dtype=bool)
        need = n
        stats = self._consumer_stats[self.index]
        stats[_C_TAKES] += 1
        while need > 0:
            need -= self._take_once(need, taken, parts)
            if need <= 0 or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        stats[_C_SHORTFALL] += max(need, 0)
        return self._batch(parts)

    def _take_once(self, need: int, taken: np.ndarray, parts: list) -> int:
        """One pass of snapshot, pick, copy, validate; appends to ``parts``, returns the count."""
        got = 0
        for _ in range(_MAX_RETRIES):
            version = self._version.copy()
            seq = self._seq.copy()
            candidates = np.flatnonzero((version % 2 == 0) & (seq >= 0) & ~taken)
            reads = self._total_reads(candidates, seq[candidates])
            keep = reads < self.max_reuse
            candidates, reads = candidates[keep], reads[keep]
            if len(candidates) == 0:
                break
            chosen = _pick(candidates, reads, seq[candidates], need - got)
            images = self._images[chosen]  # fancy indexing copies: no view leaves the segment
            meta = [column[chosen] for column in (self._source, self._target, self._strength, self._write_time)]
            valid = self._version[chosen] == version[chosen]
            n_valid = int(valid.sum())
            self._consumer_stats[self.index, _C_RETRIES] += len(chosen) - n_valid
            if n_valid:
                if n_valid < len(chosen):
                    images, meta = images[valid], [column[valid] for column in meta]
                slots = chosen[valid]
                prior = reads[np.searchsorted(candidates, slots)]
                self._count_reads(slots, seq[slots], prior, meta[3])
                parts.append((images, *meta[:3], prior == 0))
                taken[slots] = True
                got += n_valid
            if got >= need or n_valid == len(chosen):
                break
        return got

    def _count_reads(self, slots: np.ndarray, seq: np.ndarray, prior: np.ndarray, written: np.ndarray) -> None:
        own = self.index
        stale = self._reads_seq[own, slots] != seq
        self._reads[own, slots[stale]] = 0
        self._reads_seq[own, slots] = seq
        self._reads[own, slots] += 1
        stats = self._consumer_stats[own]
        stats[_C_READS] += len(slots)
        stats[_C_FRESH] += int((prior == 0).sum())
        stats[_C_AGE_SUM] += float((time.monotonic() - written).sum())

    def _batch(self, parts: list[tuple]) -> SampleBatch:
        if not parts:
            height, width = self.image_size
            return SampleBatch(torch.empty(0, 3, height, width, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                               torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0, dtype=torch.bool))
        images, source, target, strength, first_read = (np.concatenate(column) if len(parts) > 1 else column[0]
                                                        for column in zip(*parts))
        return SampleBatch(
            torch.from_numpy(images),
            torch.from_numpy(source),
            torch.from_numpy(target),
            torch.from_numpy(strength.astype(np.float32)),
            torch.from_numpy(first_read),
        )

    # -- statistics and lifetime --------------------------------------------------

    def stats(self) -> dict:
        """Ring-wide counts, summed over every producer and consumer.

        ``reads_per_sample[k]`` counts samples read ``k`` times: those already
        overwritten plus those in the ring now (the last bin collects the rest).
        """
        self._ensure_attached()
        consumer = self._consumer_stats.sum(0)
        producer = self._producer_stats.sum(0)
        seq = self._seq.copy()
        live = np.flatnonzero(seq >= 0)
        bins = self._evicted_reads.shape[1]
        histogram = self._evicted_reads.sum(0)
        histogram += np.bincount(np.minimum(self._total_reads(live, seq[live]), bins - 1), minlength=bins)
        reads = int(consumer[_C_READS])
        return {
            "slots": self.slots,
            "filled": len(live),
            "written": int(producer[_P_WRITTEN]),
            "read": reads,
            "fresh_fraction": float(consumer[_C_FRESH]) / reads if reads else 0.0,
            "mean_age_s": float(consumer[_C_AGE_SUM]) / reads if reads else 0.0,
            "retries": int(consumer[_C_RETRIES]),
            "shortfall": int(consumer[_C_SHORTFALL]),
            "producer_waits": int(producer[_P_WAITS]),
            "fresh_limit": self.fresh_limit(),
            "reads_per_sample": histogram.tolist(),
        }

    def _detaching(self) -> None:
        if self.role == "consumer" and self.index is not None:
            self._consumer_owner[self.index] = 0  # the index is free for another reader

    def __repr__(self) -> str:
        return f"SampleRing(name={self.name!r}, role={self.role!r}, index={self.index})"


def _pick(candidates: np.ndarray, reads: np.ndarray, seq: np.ndarray, need: int) -> np.ndarray:
    """Up to ``need`` slots: least-read first, then newest.

    Among the samples tied at the last read count taken, draw at random from the
    newest ``2·need`` so that consumers reading at once spread over the ring.
    """
    order = np.lexsort((-seq, reads))
    ranked, ranked_reads = candidates[order], reads[order]
    if len(ranked) <= need:
        return np.sort(ranked)
    cutoff = ranked_reads[need - 1]
    sure = ranked[ranked_reads < cutoff]
    missing = need - len(sure)
    tied = ranked[ranked_reads == cutoff][: 2 * missing]
    drawn = tied[np.random.permutation(len(tied))[:missing]]
    return np.sort(np.concatenate((sure, drawn)))


def _space_message(size: int, available: int, slots: int, height: int, width: int) -> str:
    return (
        f"A SampleRing of {slots} slots at {height}x{width} px needs {size / 2**20:.1f} MiB of shared "
        f"memory but {SHM_DIR} has {available / 2**20:.1f} MiB available; use fewer slots "
        "(--ring-slots), a smaller image size (--ring-size), or give the container more shared "
        "memory (docker run --shm-size=...)."
    )
