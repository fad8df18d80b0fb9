"""From an augmentation's name to the mixing it runs, and from a producer factory to a running generator.

``train.py``, ``onlinemix.examples.timm_train`` and ``benchmarks/bench_overhead.py`` wire
their augmentation through these functions:

- ``augmentation_name``: the one spelling of ``--aug`` (``diffmix``), from an alias too (``diff-mix``).
- ``strategy_of``: the generator strategy an augmentation runs, if any.
- ``mixing_options``: the Mixup/CutMix an augmentation runs, as ``DiffMix`` keyword arguments,
  with the paper's probability and mode unless told otherwise.
- ``create_ring_and_pool``: a ``SampleRing`` and a ``GeneratorPool`` (not started) feeding it,
  with the CPU threads shared between the trainer and CPU generator workers.
- ``OnlineGenerator``: what a training process holds of them, closed in one call.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from .plan import STRATEGIES, strategy_name

MIXING = ("none", "mixup", "cutmix")
AUGMENTATIONS = MIXING + ("replay",) + tuple(STRATEGIES) + ("diffmix+cutmix",)
# The paper's baselines, as its code runs them: CutMix per sample with probability 0.1, Mixup per batch with
# probability 0.3 (both with alpha 1).
PAPER_MIXING = {"mixup": dict(prob=0.3, mode="batch"), "cutmix": dict(prob=0.1, mode="elem")}
CUTMIX_ON_TOP = "+cutmix"


def augmentation_name(name: str) -> str:
    """The one spelling of an augmentation; a strategy's alias (``diff-mix``, ``diff-mix+cutmix``) is accepted."""
    strategy, on_top = (name[: -len(CUTMIX_ON_TOP)], CUTMIX_ON_TOP) if name.endswith(CUTMIX_ON_TOP) else (name, "")
    if strategy not in MIXING + ("replay",):
        try:
            strategy = strategy_name(strategy)
        except ValueError:
            pass  # argparse's choices report the unknown name
    return strategy + on_top


def strategy_of(aug: str) -> Optional[str]:
    """The generator strategy ``aug`` runs (``diffmix+cutmix``: ``diffmix``); None for none, mixup,
    cutmix and replay."""
    strategy = aug[: -len(CUTMIX_ON_TOP)] if aug.endswith(CUTMIX_ON_TOP) else aug
    return None if strategy in MIXING + ("replay",) else strategy_name(strategy)


def mixing_options(aug: str, *, mixup_alpha: float = 1.0, cutmix_alpha: float = 1.0, prob: Optional[float] = None,
                   mode: Optional[str] = None) -> dict:
    """The ``DiffMix`` keyword arguments of the Mixup or CutMix ``aug`` runs (none: ``{}``).

    Args:
        aug: An augmentation name; ``mixup``, ``cutmix`` and ``<strategy>+cutmix`` mix.
        mixup_alpha: Mixup's Beta parameter.
        cutmix_alpha: CutMix's Beta parameter.
        prob: Probability of mixing, per batch or per sample by ``mode``; None: the paper's.
        mode: timm's mixing mode (``batch``, ``pair``, ``elem``); None: the paper's.
    """
    kind = "mixup" if aug == "mixup" else "cutmix" if aug == "cutmix" or aug.endswith(CUTMIX_ON_TOP) else None
    if kind is None:
        return {}
    return {f"{kind}_alpha": mixup_alpha if kind == "mixup" else cutmix_alpha,
            "prob": PAPER_MIXING[kind]["prob"] if prob is None else prob,
            "mode": mode or PAPER_MIXING[kind]["mode"]}


def create_ring_and_pool(factory, devices: Sequence[str], *, workers_per_device: int = 1, slots: int,
                     image_size: int, consumers: int = 1, max_reuse: int = 4, seed: int = 0,
                     hang_timeout: float = 600.0, cluster: Optional[str] = None, cluster_workers: int = 1,
                     cluster_gpus: float = 1.0):
    """A ring and the generator pool that will feed it; start the pool with ``pool.start()``.

    The ring has one producer index per worker (``len(devices) * workers_per_device``) and
    ``consumers`` consumer indices (every training rank on the node, every DataLoader
    worker that reads it). Torch's threads are shared between this process and CPU
    workers (``onlinemix.pool.share_cpu_threads``); a worker silent for ``hang_timeout`` seconds is
    restarted. With ``cluster`` (a Ray address, ``"auto"``, or ``"local"`` for a Ray instance on
    this machine) the workers are
    ``cluster_workers`` Ray actors of ``cluster_gpus`` GPUs each instead (``onlinemix.cluster``),
    and ``devices`` is unused: one feeder process is the ring's only producer.

    Returns:
        ``(ring, pool)``; close the ring after stopping the pool.
    """
    from .pool import GeneratorPool, share_cpu_threads
    from .ring import SampleRing

    producers = 1 if cluster else len(devices) * workers_per_device
    ring = SampleRing.create(slots, image_size, producers=producers, consumers=consumers, max_reuse=max_reuse)
    try:
        if cluster:
            from .cluster import ClusterPool

            pool = ClusterPool(ring, factory, workers=cluster_workers, address=cluster,
                               num_gpus=cluster_gpus, seed=seed)
        else:
            pool = GeneratorPool(ring, factory, list(devices), workers_per_device=workers_per_device, seed=seed,
                                 cpu_threads=share_cpu_threads(devices, workers_per_device),
                                 hang_timeout=hang_timeout)
    except BaseException:
        ring.close()
        raise
    return ring, pool


@dataclasses.dataclass
class OnlineGenerator:
    """What a training process holds of the online generator: the ring it reads and, on each node's local
    rank 0 (the one that made them), the pool feeding the ring and the closed loop's ``FeedbackBlock``."""

    ring: Any
    pool: Any = None
    feedback: Any = None

    def close(self) -> None:
        """Stop the pool, then close the ring and the feedback block."""
        if self.pool is not None:
            self.pool.stop()
        self.ring.close()
        if self.feedback is not None:
            self.feedback.close()
