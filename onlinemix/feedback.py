"""The closed loop's channel: what the classifier gets wrong, from the trainer to every generator worker.

``ConfusionTracker`` (trainer side) counts, on the *real* rows of each training batch,
true class × the classifier's top-1 from the logits the step computes anyway, and keeps
an exponential moving average of the row-normalised counts. ``FeedbackBlock`` is a small
shared-memory segment next to the ring that carries that matrix, the training progress
and a publication number; the trainer publishes every N steps, workers read the latest
publication before planning each batch (a worker that starts late or restarts reads it
at its first batch).

Protocol: one writer (the process that created the block), any number of readers. The
writer makes the version odd, writes, then makes it even; a reader copies and keeps the
copy only if the version was even and did not move meanwhile, otherwise it retries. The
segment's lifecycle (untracked, unlinked by its owner, swept after a ``kill -9``) is
``onlinemix.segments``'s, as for the ring.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import NamedTuple, Optional

import numpy as np
import torch

from .segments import FEEDBACK_MAGIC, HEADER_WORDS, LAYOUT_WORD, PREFIX, SharedSegment

_LAYOUT_VERSION = 1
_H_CLASSES = LAYOUT_WORD + 1
_VERSION, _PUBLICATION, _STEP, _PROGRESS = range(4)  # the int64/float64 words after the header
_STATE_WORDS = 4
_MAX_RETRIES = 1000


class Feedback(NamedTuple):
    """One publication: ``confusion[t, p]``, the EMA share of class ``t``'s real training samples the
    classifier called ``p`` (rows sum to 1, or 0 for a class not seen yet); ``progress`` in [0, 1] is
    the share of training done; ``publication`` counts publications (0: none yet)."""

    confusion: np.ndarray
    progress: float
    step: int
    publication: int


class FeedbackBlock(SharedSegment):
    """A shared-memory block carrying the trainer's latest ``Feedback``; pickles as its name.

    Create it with ``FeedbackBlock.create(num_classes)`` in the trainer (the only writer);
    workers get it pickled and attach on first ``read``.
    """

    KIND, MAGIC, LAYOUT = "FeedbackBlock", FEEDBACK_MAGIC, _LAYOUT_VERSION

    @classmethod
    def create(cls, num_classes: int, *, name: Optional[str] = None) -> "FeedbackBlock":
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}.")
        name = name or f"{PREFIX}feedback-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        size = _size(num_classes)
        shm = cls._new_segment(name, size, lambda available: (
            f"The feedback block needs {size} bytes of shared memory but /dev/shm has {available}."),
            {_H_CLASSES: num_classes})
        block = cls(name)
        block._own(shm)
        return block

    def _missing_message(self) -> str:
        return f"No FeedbackBlock named {self.name!r}: its trainer closed it or exited."

    def _views(self, shm, header: np.ndarray) -> None:
        self.num_classes = int(header[_H_CLASSES])
        offset = HEADER_WORDS * 8
        self._state = np.ndarray((_STATE_WORDS,), np.float64, shm.buf, offset)
        self._matrix = np.ndarray((self.num_classes, self.num_classes), np.float64, shm.buf, offset + _STATE_WORDS * 8)

    def publish(self, confusion: np.ndarray, *, progress: float, step: int) -> int:
        """Write a new publication (creator only); returns its number."""
        self._ensure_attached()
        if not self._owner:
            raise ValueError("Only the process that created a FeedbackBlock publishes to it.")
        confusion = np.asarray(confusion, dtype=np.float64)
        if confusion.shape != (self.num_classes, self.num_classes):
            raise ValueError(f"confusion must be {self.num_classes}x{self.num_classes}, got {confusion.shape}.")
        state = self._state
        publication = int(state[_PUBLICATION]) + 1
        state[_VERSION] += 1  # odd: being written
        self._matrix[:] = confusion
        state[_PUBLICATION], state[_STEP], state[_PROGRESS] = publication, step, float(progress)
        state[_VERSION] += 1  # even: published
        return publication

    def read(self) -> Feedback:
        """The latest publication, copied whole (retries while the writer is mid-write)."""
        self._ensure_attached()
        state = self._state
        for _ in range(_MAX_RETRIES):
            before = state[_VERSION]
            if before % 2 == 0:
                matrix, copy = self._matrix.copy(), state.copy()
                if state[_VERSION] == before:
                    return Feedback(matrix, float(copy[_PROGRESS]), int(copy[_STEP]), int(copy[_PUBLICATION]))
            time.sleep(0)
        raise TimeoutError(f"FeedbackBlock {self.name!r} stayed mid-write for {_MAX_RETRIES} reads.")


def _size(num_classes: int) -> int:
    return HEADER_WORDS * 8 + _STATE_WORDS * 8 + num_classes * num_classes * 8


class ConfusionTracker:
    """An EMA of the classifier's confusion on real training samples, from logits the step computes anyway.

    Args:
        num_classes: Number of classes.
        decay: Weight of the previous matrix at each ``flush`` (0.8: a publication's counts
            weigh 0.2); a class first seen takes its counts as they are.
    """

    def __init__(self, num_classes: int, *, decay: float = 0.8):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must lie in [0, 1), got {decay}.")
        self.num_classes, self.decay = num_classes, decay
        self.counts = torch.zeros(num_classes * num_classes, dtype=torch.int64)
        self.confusion = np.zeros((num_classes, num_classes))

    def update(self, logits: torch.Tensor, labels: torch.Tensor, synthetic_rows: Optional[torch.Tensor]) -> None:
        """Count the real rows' (true, predicted) pairs; ``synthetic_rows`` are left out."""
        real = torch.ones(len(labels), dtype=torch.bool)
        if synthetic_rows is not None:
            real[synthetic_rows] = False
        predicted = logits.detach().argmax(1).cpu()[real]
        self.counts += torch.bincount(labels.cpu()[real] * self.num_classes + predicted,
                                      minlength=self.num_classes ** 2)

    def pending(self) -> np.ndarray:
        """Counts since the last ``flush`` as a ``[C, C]`` array, for merging over ranks."""
        return self.counts.view(self.num_classes, self.num_classes).numpy().copy()

    def flush(self, counts: np.ndarray) -> np.ndarray:
        """Fold ``counts`` (this rank's ``pending``, or every rank's summed) into the EMA; returns it."""
        totals = counts.sum(1, keepdims=True)
        seen = totals[:, 0] > 0
        fresh = np.divide(counts, totals, out=np.zeros_like(self.confusion), where=totals > 0)
        known = self.confusion.sum(1) > 0
        blend = seen & known
        self.confusion[blend] = self.decay * self.confusion[blend] + (1 - self.decay) * fresh[blend]
        self.confusion[seen & ~known] = fresh[seen & ~known]
        self.counts.zero_()
        return self.confusion.copy()


class ClosedLoop:
    """The trainer's side of the loop: track the confusion every step, publish it every ``every``
    steps, and count the (target, source) pairs the classifier trained on.

    Args:
        num_classes: Number of classes.
        block: The ``FeedbackBlock`` this process publishes to (each node's local rank 0), else None.
        every: Steps between publications.
        total_steps: Training steps in all, for the progress a strength schedule follows.
        gather: ``gather(value) -> [value of every rank]``; ranks must call ``step`` in lockstep.
    """

    def __init__(self, num_classes: int, block: Optional[FeedbackBlock], *, every: int, total_steps: int, gather):
        self.block, self.every, self.total_steps, self.gather = block, every, total_steps, gather
        self.tracker = ConfusionTracker(num_classes)
        self.pairs = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.publication = 0

    def step(self, global_step: int, logits: torch.Tensor, labels: torch.Tensor, synthetic) -> None:
        """After the forward of step ``global_step`` (counted from 0): ``labels`` are the batch's hard
        labels before augmentation, ``synthetic`` the transform's ``SyntheticRows`` (or None)."""
        self.tracker.update(logits, labels, synthetic.rows if synthetic is not None else None)
        if synthetic is not None:
            np.add.at(self.pairs, (synthetic.target.numpy(), synthetic.source.numpy()), 1)
        if (global_step + 1) % self.every == 0:
            confusion = self.tracker.flush(sum(self.gather(self.tracker.pending())))
            if self.block is not None:
                self.publication = self.block.publish(confusion, progress=(global_step + 1) / self.total_steps,
                                                      step=global_step + 1)

    def epoch_state(self) -> dict:
        """This epoch's pairs over all ranks and the confusion that drove them; resets the pair counts.

        Returns ``{"publication", "error", "top_confusions", "top_pairs", "pairs_on_confusions",
        "confusion", "pairs"}``; the last two are arrays, for the heatmap, not for metrics files.
        """
        pairs = sum(self.gather(self.pairs))
        self.pairs[:] = 0
        confusion = self.tracker.confusion
        seen = confusion.sum(1) > 0
        off = confusion * (1 - np.eye(len(confusion)))
        generated = pairs.sum()
        return {
            "publication": self.publication,
            "error": float(1 - np.diag(confusion)[seen].mean()) if seen.any() else None,
            "top_confusions": _top(off, 5, 4),
            "top_pairs": _top(pairs, 5, 0),
            # The share of this epoch's synthetic samples whose (target, source) the classifier confuses.
            "pairs_on_confusions": float(pairs[off > 0].sum() / generated) if generated else None,
            "confusion": confusion.copy(),
            "pairs": pairs,
        }


def _top(matrix: np.ndarray, count: int, digits: int) -> list:
    """The ``count`` largest entries as ``[row, column, value]``, zeros left out."""
    order = np.argsort(matrix, axis=None)[::-1][:count]
    rows, columns = np.unravel_index(order, matrix.shape)
    return [[int(r), int(c), round(float(matrix[r, c]), digits) if digits else int(matrix[r, c])]
            for r, c in zip(rows, columns) if matrix[r, c] > 0]
