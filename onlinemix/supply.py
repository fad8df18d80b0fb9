"""Supply against demand: what the online generator gave the trainer each epoch, a warning when it
starves, and the fresh-supply budget's schedule.

The trainer asks for ``p`` × its samples in synthetic images; the ring hands out what the
generator has written, each sample up to ``max_reuse`` times. ``SupplyCounts`` are the running
totals at one moment (``DiffMix.stats()`` over all ranks, ``SampleRing.stats()``, the pool's
busy seconds); ``supply_figures`` turns two of them into one epoch's figures; ``SupplyWatch``
says, once per picture, when the trainer gets fewer than ``STARVED_BELOW`` × the synthetic samples it
asked for, and what would close the gap, with this run's numbers.

``budget_schedule`` spreads a budget of unique samples evenly over a run's epochs, in whole
generator batches, so each epoch's samples are reused about as often as the others'.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Optional, Sequence

# Of the synthetic samples asked: the share got under which the trainer is starved. Against what was asked,
# not p x samples: the asks are coin flips (at p = 0.3, 96 samples ask fewer than 0.9 p x 96 about one epoch
# in four), and a short draw is no shortage of supply.
STARVED_BELOW = 0.9
# The recommended fast set and what it measured on the demo's CPU generator (docs/speed.md,
# benchmarks/results/generator_options_cpu_demo_float32.json).
FAST_SET, FAST_SET_SPEEDUP = "--gen-deep-cache 2 --gen-steps 20", 2.3
logger = logging.getLogger("onlinemix")


@dataclasses.dataclass(frozen=True)
class SupplyCounts:
    """Running totals at one moment of a run.

    Args:
        time: ``time.monotonic()`` when they were read.
        samples: Training samples seen with mixing on, over all ranks (``DiffMix.stats()``).
        requested: Of those, the ones chosen for a synthetic replacement.
        replaced: Of those, the ones that got one.
        written: Samples the generator wrote into the ring (``SampleRing.stats()``).
        reads: Samples read from the ring.
        fresh_reads: Reads of a sample nobody had read before.
        age_sum: The reads' summed age (seconds since the sample was written).
        filled: Samples in the ring now.
        slots: The ring's slots.
        busy_s: Seconds the generator workers spent making samples (``GeneratorPool.stats()``; None where
            the pool does not know, as on a Ray cluster).
    """

    time: float
    samples: int
    requested: int
    replaced: int
    written: int = 0
    reads: int = 0
    fresh_reads: int = 0
    age_sum: float = 0.0
    filled: int = 0
    slots: int = 0
    busy_s: Optional[float] = 0.0

    @classmethod
    def read(cls, time: float, augmentation: dict, ring: Optional[dict] = None,
             generator: Optional[dict] = None) -> "SupplyCounts":
        """From ``DiffMix.stats()`` totals over the ranks and, for an online generator, ``ring.stats()`` and
        ``pool.stats()``."""
        counts = dict(time=time, samples=augmentation["samples"], requested=augmentation["requested"],
                      replaced=augmentation["replaced"])
        if ring is not None:
            counts.update(written=ring["written"], reads=ring["read"],
                          fresh_reads=round(ring["fresh_fraction"] * ring["read"]),
                          age_sum=ring["mean_age_s"] * ring["read"], filled=ring["filled"], slots=ring["slots"])
        if generator is not None:
            counts["busy_s"] = generator.get("busy_s")
        return cls(**counts)


def supply_figures(before: SupplyCounts, after: SupplyCounts, *, p: float) -> dict:
    """What the trainer asked for and got between ``before`` and ``after`` (one epoch), at replacement
    probability ``p``.

    Returns:
        ``asked`` and ``got`` synthetic samples, the realised ``fraction`` of samples (against ``p``),
        ``fresh_reads`` and ``reused_reads`` from the ring, ``generator_images_per_s`` (written) and
        ``demand_images_per_s`` (asked) over the epoch's wall-clock seconds, ``generator_busy_s`` (None
        when unknown),
        ``ring_occupancy`` (filled share of the slots at the end) and ``sample_age_s`` (mean age of
        the epoch's reads; None without reads).
    """
    seconds = max(after.time - before.time, 1e-9)
    samples = after.samples - before.samples
    reads = after.reads - before.reads
    fresh = after.fresh_reads - before.fresh_reads
    return {
        "p": p,
        "asked": after.requested - before.requested,
        "got": after.replaced - before.replaced,
        "fraction": (after.replaced - before.replaced) / samples if samples else 0.0,
        "fresh_reads": fresh,
        "reused_reads": reads - fresh,
        "written": after.written - before.written,
        "seconds": seconds,
        "generator_images_per_s": (after.written - before.written) / seconds,
        "demand_images_per_s": (after.requested - before.requested) / seconds,
        "generator_busy_s": None if after.busy_s is None else after.busy_s - (before.busy_s or 0.0),
        "ring_occupancy": after.filled / after.slots if after.slots else 0.0,
        "sample_age_s": (after.age_sum - before.age_sum) / reads if reads else None,
    }


def reuse_to_keep_p(asked: float, fresh: float) -> int:
    """The ``--max-reuse`` at which ``fresh`` unique samples serve ``asked`` reads."""
    return max(1, math.ceil(asked / fresh)) if fresh > 0 else 0


class SupplyWatch:
    """Warns when the trainer gets less than ``STARVED_BELOW`` × the synthetic samples it asked for, once per
    picture.

    The picture is the gap (asked / got, in steps of a quarter of a doubling) and what limits the
    supply (the generator's speed, or the budget); a warning comes again only when it changes, and
    once the trainer is fed a later starvation warns anew.

    Args:
        max_reuse: The ring's ``--max-reuse``.
        devices: The generator devices (``--gen-device``), or None on a cluster.
        fast_set: Whether the generator already runs a DeepCache set (then it is not suggested).
        budget: The fresh-supply budget (``--gen-budget``), or None.
    """

    def __init__(self, *, max_reuse: int, devices: Optional[Sequence[str]], fast_set: bool,
                 budget: Optional[int] = None):
        self.max_reuse = max_reuse
        self.devices = list(devices) if devices is not None else None
        self.fast_set = fast_set
        self.budget = budget
        self.picture = None

    def __call__(self, figures: dict) -> Optional[str]:
        """The warning for one epoch's ``supply_figures``, or None (fed, or the same picture as last said)."""
        p, asked, got = figures["p"], figures["asked"], figures["got"]
        if p <= 0 or asked == 0 or got >= STARVED_BELOW * asked:
            self.picture = None
            return None
        picture = (round(4 * math.log2(asked / max(got, 1))), self.budget is not None)
        if picture == self.picture:
            return None
        self.picture = picture
        return self.advice(figures)

    def advice(self, figures: dict) -> str:
        """The warning's text: the figures, then what would close the gap."""
        p, asked, got = figures["p"], figures["asked"], figures["got"]
        made, demand = figures["generator_images_per_s"], figures["demand_images_per_s"]
        text = (f"the trainer is short of synthetic samples: it got {got} of the {asked} it asked for this epoch "
                f"(fraction {figures['fraction']:.3f} against p = {p:g}); it asks {demand:.2f} images/s and the "
                f"generator wrote {made:.2f}/s ({figures['fresh_reads']} fresh and {figures['reused_reads']} reused "
                f"reads, each sample read at most --max-reuse {self.max_reuse} times).")
        reuse = reuse_to_keep_p(asked, figures["written"])
        ways = []
        if reuse > self.max_reuse:
            ways.append(f"--max-reuse {reuse} (each sample read up to {reuse} times)")
        if self.budget is not None:
            ways.append(f"a larger --gen-budget than {self.budget}")
        else:
            gap = demand / made if made > 0 else math.inf
            if not self.fast_set:
                ways.append(f"the fast set `{FAST_SET}` ({FAST_SET_SPEEDUP}x the images/s on the demo's CPU "
                            "generator, docs/speed.md)")
            if self.devices is not None and math.isfinite(gap):
                needed = math.ceil(gap * len(self.devices))
                if needed > len(self.devices):
                    ways.append(f"{needed} generator devices at this speed instead of {len(self.devices)} "
                                "(--gen-device)")
            if math.isfinite(gap):
                ways.append(f"--gen-cluster with workers making {gap:.1f}x these images/s in all")
        if not ways:
            return text
        return text + " To close the gap: " + "; or ".join(ways) + "."


def budget_schedule(budget: int, epochs: int, quantum: int) -> list[int]:
    """How many unique samples the generator may have written by the end of each epoch: ``budget``
    spread evenly over ``epochs``, rounded up to whole ``quantum`` (a batch of every generator
    worker, so none is made in part) and never above ``budget``. Rounding up gives the first epoch
    samples to start with.

    Raises:
        ValueError: for a budget, epoch count or quantum below 1.
    """
    if budget < 1 or epochs < 1 or quantum < 1:
        raise ValueError(f"budget, epochs and quantum must be >= 1, got {budget}, {epochs} and {quantum}.")
    return [min(budget, -(-budget * (epoch + 1) // (epochs * quantum)) * quantum) for epoch in range(epochs)]


class SupplyMonitor:
    """A run's supply bookkeeping: each epoch's fresh-supply limit on the ring (from ``budget_schedule``)
    and, at its end, the ``supply_figures`` with ``SupplyWatch``'s warning logged.

    Args:
        generator: The ``OnlineGenerator``; only where it holds the pool (a node's local rank 0) does the
            monitor set the ring's limit.
        p: The replacement probability.
        epochs: The run's epochs.
        watch: The ``SupplyWatch``.
        budget: Unique samples the generator may make over the run (``--gen-budget``), or None.
        quantum: Samples per round of every generator worker (``budget_schedule``).
        start_epoch: The first epoch this process trains (a resumed run's ring is new, so the samples of
            the epochs before are not its to count).
    """

    def __init__(self, generator, *, p: float, epochs: int, watch: SupplyWatch, budget: Optional[int] = None,
                 quantum: int = 1, start_epoch: int = 0):
        self.generator, self.p, self.watch = generator, p, watch
        self.schedule = budget_schedule(budget, epochs, quantum) if budget is not None else None
        self.made_before = self.schedule[start_epoch - 1] if self.schedule and start_epoch > 0 else 0
        self.before: Optional[SupplyCounts] = None

    @classmethod
    def for_run(cls, args, generator, samples_per_epoch: int, start_epoch: int) -> "SupplyMonitor":
        """The monitor of a ``train.py`` run (``args``), warning at the start when ``--gen-budget`` is too small
        for ``--max-reuse`` to keep ``--p``."""
        watch = SupplyWatch(max_reuse=args.max_reuse, devices=None if args.gen_cluster else args.gen_device,
                            fast_set=args.gen_deep_cache > 1, budget=args.gen_budget)
        if args.gen_budget is not None:
            reuse = reuse_to_keep_p(args.p * samples_per_epoch * args.epochs, args.gen_budget)
            if reuse > args.max_reuse:
                logger.warning("--gen-budget %d unique samples with --max-reuse %d serve at most %d of the about "
                               "%d synthetic samples --p %g asks for over the run; --max-reuse %d would keep p.",
                               args.gen_budget, args.max_reuse, args.gen_budget * args.max_reuse,
                               round(args.p * samples_per_epoch * args.epochs), args.p, reuse)
        return cls(generator, p=args.p, epochs=args.epochs, watch=watch, budget=args.gen_budget,
                   quantum=args.gen_batch_size * generator.ring.producers, start_epoch=start_epoch)

    def limit(self, epoch: int) -> Optional[int]:
        """The ring's fresh-supply limit during ``epoch`` (None: no budget)."""
        return None if self.schedule is None else self.schedule[epoch] - self.made_before

    def open_epoch(self, epoch: int) -> None:
        """Before ``epoch``'s first batch (and before the pool starts): its limit; the first counts to start from."""
        if self.generator.pool is not None:
            self.generator.ring.set_fresh_limit(self.limit(epoch))
        if self.before is None:
            self.before = self.read({"samples": 0, "requested": 0, "replaced": 0})

    def read(self, augmentation: dict) -> SupplyCounts:
        pool = self.generator.pool
        return SupplyCounts.read(time.monotonic(), augmentation, self.generator.ring.stats(),
                                 pool.stats() if pool is not None else None)

    def close_epoch(self, augmentation: dict) -> dict:
        """The figures since the last call (the epoch, the evaluation after the one before included), from
        ``augmentation``, ``DiffMix.stats()`` summed over the ranks; logs the starvation warning if any."""
        after = self.read(augmentation)
        figures, self.before = supply_figures(self.before, after, p=self.p), after
        warning = self.watch(figures)
        if warning is not None:
            logger.warning(warning)
        return figures
