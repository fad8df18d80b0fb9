"""What the classifier calls the synthetic samples it trains on: a fidelity monitor that needs no probe.

Diff-Mix's label puts weight ``s^γ`` on the target class because a translation is meant to
look like the target. Whether it does is visible during training at no cost: the
classifier's logits on every synthetic row are computed anyway. ``FidelityMonitor``
counts, per SDEdit strength, how often the classifier's top-1 on a synthetic sample is
the target class, the source class (the reference's), or another class. A personalisation
that renders the target shows a target share that rises with strength and with training;
one that does not shows the source (low strengths) or "other".

Shares are over the images as trained, after any Mixup/CutMix on top, and come from
the model in training mode. For intra-class strategies (Diff-Aug, Diff-Gen) source and
target coincide and count as target.

A sample read again (``--max-reuse``) has been trained on already, its label included, so
the share over all reads mixes "does the generator render the target" with "has the
classifier learned this sample". The shares over each sample's *first* read
(``SampleBatch.first_read``, which rings and the bundled sources report) answer the first
question alone; they are reported beside the all-reads shares under ``first_read``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .batch import SyntheticRows

CALLS = ("target", "source", "other")


def classifier_calls(predicted: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """int64 ``[K]``: 0 where ``predicted`` is the target class, 1 the source class (when it differs
    from the target), 2 anything else."""
    calls = torch.full_like(predicted, 2)
    calls[predicted == source] = 1
    calls[predicted == target] = 0
    return calls


class FidelityMonitor:
    """Counts what the classifier calls the synthetic rows of each training batch, per strength.

    Feed it each step's logits and ``DiffMix.synthetic``; read ``summary`` once per epoch
    (after ``merge`` over ranks), then ``reset``.
    """

    def __init__(self):
        # strength (rounded to 3 decimals) -> [target, source, other] over all reads, then over first reads
        self.counts = {}

    def reset(self) -> None:
        self.counts = {}

    @torch.no_grad()
    def update(self, logits: torch.Tensor, synthetic: Optional[SyntheticRows]) -> None:
        """Count the calls on ``synthetic``'s rows of ``logits`` (``[B, C]``, any device); None: nothing replaced."""
        if synthetic is None:
            return
        predicted = logits.detach()[synthetic.rows.to(logits.device)].argmax(1).cpu()
        calls = classifier_calls(predicted, synthetic.source, synthetic.target)
        first = synthetic.first_read
        for strength in torch.unique(synthetic.strength).tolist():
            at = synthetic.strength == strength
            row = self.counts.setdefault(round(strength, 3), [0] * (2 * len(CALLS)))
            for k in range(len(CALLS)):
                row[k] += int((calls[at] == k).sum())
                if first is not None:
                    row[len(CALLS) + k] += int((calls[at & first] == k).sum())

    def state(self) -> dict:
        """The counts, to gather from every rank."""
        return {strength: list(row) for strength, row in self.counts.items()}

    @staticmethod
    def merge(states: Iterable[dict]) -> dict:
        """The counts of several ranks' ``state()``, summed."""
        merged = {}
        for state in states:
            for strength, row in state.items():
                total = merged.setdefault(strength, [0] * len(row))
                for k, value in enumerate(row):
                    total[k] += value
        return merged

    @staticmethod
    def summary(counts: dict) -> dict:
        """``{"s=0.5": {"count", "target", "source", "other", "first_read": {...}}, ..., "all": {...}}`` with
        shares in [0, 1], ``first_read`` the same over each sample's first read (absent when no first read
        was reported); empty when no synthetic sample was seen."""
        if not counts:
            return {}
        rows = {f"s={strength:g}": row for strength, row in sorted(counts.items())}
        rows["all"] = [sum(row[k] for row in counts.values()) for k in range(2 * len(CALLS))]
        summary = {}
        for name, row in rows.items():
            if sum(row[:len(CALLS)]):
                summary[name] = call_shares(row[:len(CALLS)])
                if sum(row[len(CALLS):]):
                    summary[name]["first_read"] = call_shares(row[len(CALLS):])
        return summary


def call_shares(row) -> dict:
    """``{"count", "target", "source", "other"}`` of one ``[target, source, other]`` count row."""
    return {"count": sum(row), **{call: row[k] / sum(row) for k, call in enumerate(CALLS)}}
