"""ClusterPool: generator workers as Ray actors on other machines, feeding this node's ring.

``ClusterPool`` has ``GeneratorPool``'s face (``start``, ``warm_up``, ``stop``, ``stats``, a
context manager), so the trainer and the transform see no difference. Each worker is a Ray
actor holding ``num_gpus`` GPUs (one by default; none runs it on the CPU) that builds its
producer from the same picklable factory the local pool uses, seeded as a local worker is
(``seed + 1000·index + incarnation``), and answers ``produce`` with the next ``SampleBatch``.

A feeder thread in this process, the ring's owner, keeps at most ``in_flight`` requests per
actor outstanding, takes whichever batch is ready first (``ray.wait``) and puts it into the
ring, waiting while the ring is full: an actor gets its next request only once its previous
batch is in the ring, so a slow trainer holds the cluster back instead of filling memory.

Faults: Ray restarts a dead actor (``max_restarts``); a request that met the dead one fails
(``RayActorError``), the next reaches the new incarnation, which builds its producer with the
next seed. A worker that keeps failing is given up. When a Ray call fails in a way the
feeder does not know, it warns loudly and stops: the ring runs dry and training keeps its
real images. Not yet safe: this process is Ray's driver, and Ray may end a driver whose head
node stays unreachable (``gcs_rpc_server_reconnect_timeout_s``), which would end the trainer
with it; moving the feeder into a process of its own is the next step (issue 21).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .batch import ProducerFactory
from .pool import fill_ring, worker_totals
from .ring import SampleRing

logger = logging.getLogger("onlinemix")

_WAIT_S = 0.2


def import_ray():
    """The ``ray`` module, or an install hint."""
    try:
        import ray
    except ImportError:
        raise ImportError("Generating on a Ray cluster needs Ray: pip install 'onlinemix[ray]'.") from None
    return ray


def check_reachable(address: Optional[str], *, timeout: float = 5.0) -> None:
    """Stop in seconds on a cluster address nothing answers at (``ray.init`` would wait for minutes).

    ``HOST:PORT`` and ``ray://HOST:PORT`` are tried with a TCP connection; ``"auto"`` (Ray finds the
    cluster this machine joined, or fails at once), ``"local"`` and None are left to Ray.
    """
    if address in (None, "auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"The Ray cluster address {address!r} is not HOST:PORT, ray://HOST:PORT, 'auto' or 'local'.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(f"Nothing answers at the Ray cluster address {address!r} ({error}); start the cluster "
                              "with `ray start --head` and pass the address it prints (--gen-cluster).") from None


class GeneratorActor:
    """One remote generator worker (a Ray actor class once ``ray.remote`` wraps it).

    Args:
        factory: ``factory(device) -> Producer``, the local pool's.
        device: ``"cuda"`` on an actor with a GPU (Ray sets its visible devices), else ``"cpu"``.
        cpu_threads: Torch threads on the CPU; None: torch's default.
    """

    def __init__(self, factory: ProducerFactory, device: str, cpu_threads: Optional[int] = None):
        self.factory, self.device, self.cpu_threads = factory, device, cpu_threads
        self.producer = None

    def produce(self, seed: int) -> tuple:
        """``(batch, dropped, pid)``: the next batch, the producer's dropped count and this incarnation's
        process id; the first call of an incarnation builds the producer after seeding NumPy with ``seed``."""
        if self.producer is None:
            if self.cpu_threads is not None and self.device == "cpu":
                import torch

                torch.set_num_threads(self.cpu_threads)
            np.random.seed(seed)
            self.producer = self.factory(self.device)
        return self.producer(), self.producer.dropped, os.getpid()


@dataclass
class _Remote:
    index: int
    actor: object = None
    pids: list = field(default_factory=list)
    written: int = 0
    dropped: dict = field(default_factory=dict)  # per incarnation (pid): each producer counts its own
    failures: int = 0  # in a row
    errors: int = 0
    gone: bool = False
    started: float = 0.0


class ClusterPool:
    """Ray actors generating for one ``SampleRing`` (``GeneratorPool``'s interface).

    Args:
        ring: The ring this process created; the feeder writes as its producer 0.
        factory: Picklable ``factory(device) -> Producer``.
        workers: How many actors.
        address: The Ray cluster (``"auto"``, ``"ray://host:10001"`` ...) to connect to when this
            process is not connected yet; None: start a local Ray instance.
        num_gpus: GPUs per actor (0: a CPU actor, for tests and CPU clusters).
        num_cpus: CPUs per actor.
        in_flight: Requests outstanding per actor.
        max_restarts: Restarts Ray grants each actor; a worker failing this many times in a row is
            given up.
        seed: Base seed, as ``GeneratorPool``'s.
        cpu_threads: Torch threads of a CPU actor.
    """

    def __init__(self, ring: SampleRing, factory: ProducerFactory, *, workers: int, address: Optional[str] = None,
                 num_gpus: float = 1.0, num_cpus: float = 1.0, in_flight: int = 2, max_restarts: int = 5,
                 seed: int = 0, cpu_threads: Optional[int] = None):
        import_ray()
        if workers < 1 or in_flight < 1:
            raise ValueError(f"workers and in_flight must be >= 1, got {workers} and {in_flight}.")
        if num_gpus < 0 or num_cpus < 0 or max_restarts < 0:
            raise ValueError("num_gpus, num_cpus and max_restarts must be >= 0.")
        if not callable(factory):
            raise ValueError(f"factory must be callable as factory(device), got {type(factory).__name__}.")
        self.ring, self.factory, self.address = ring, factory, address
        self.num_gpus, self.num_cpus, self.in_flight = num_gpus, num_cpus, in_flight
        self.max_restarts, self.seed, self.cpu_threads = max_restarts, seed, cpu_threads
        self._remotes = [_Remote(i) for i in range(workers)]
        self._feeder: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._writer: Optional[SampleRing] = None
        self.lost: Optional[str] = None  # why the cluster was lost, if it was

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> "ClusterPool":
        """Connect (an unreachable address stops here), check the cluster's GPUs, start actors and feeder."""
        ray = import_ray()
        if self._feeder is not None:
            raise ValueError("ClusterPool.start() was already called.")
        if not ray.is_initialized():
            check_reachable(self.address)
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ConnectionError(f"Could not reach the Ray cluster at {self.address!r} ({error}); start it with "
                                      "`ray start --head` on a machine of the cluster, or pass its address "
                                      "(--gen-cluster ADDRESS).") from None
        needed = self.num_gpus * len(self._remotes)
        available = ray.cluster_resources().get("GPU", 0.0)
        if needed > available:
            raise ValueError(f"{len(self._remotes)} generator actors with {self.num_gpus:g} GPU(s) each need {needed:g} "
                             f"GPUs, but the Ray cluster has {available:g}; add GPU nodes or ask for fewer workers.")
        actor_class = ray.remote(num_gpus=self.num_gpus, num_cpus=self.num_cpus, max_restarts=self.max_restarts,
                                 max_task_retries=0)(GeneratorActor)
        device = "cuda" if self.num_gpus > 0 else "cpu"
        for remote in self._remotes:
            remote.actor = actor_class.remote(self.factory, device, self.cpu_threads)
            remote.started = time.monotonic()
        self._writer = SampleRing.attach(self.ring.name, "producer", 0)
        self._feeder = threading.Thread(target=self._feed, name="onlinemix-cluster-feeder", daemon=True)
        self._feeder.start()
        return self

    def warm_up(self, count: int, *, timeout: float, progress: bool = True) -> int:
        """As ``GeneratorPool.warm_up``: wait for ``count`` samples in the ring, at most ``timeout`` seconds."""
        if self._feeder is None:
            raise ValueError("Call ClusterPool.start() before warm_up().")
        return fill_ring(self.ring, count, timeout=timeout, progress=progress,
                         gone=lambda: all(r.gone for r in self._remotes) or self.lost is not None)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the feeder, then the actors; the ring keeps what was written."""
        self._stopping.set()
        if self._feeder is not None:
            self._feeder.join(timeout)
        if self.lost is None:
            ray = import_ray()
            for remote in self._remotes:
                if remote.actor is not None:
                    try:
                        ray.kill(remote.actor, no_restart=True)
                    except Exception:  # the cluster may be gone already; nothing is left to stop then
                        pass
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "ClusterPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- feeding ------------------------------------------------------------------

    def _request(self, remote: _Remote, pending: dict) -> None:
        seed = self.seed + 1000 * remote.index + len(remote.pids)
        pending[remote.actor.produce.remote(seed)] = remote

    def _feed(self) -> None:
        ray = import_ray()
        pending: dict = {}
        try:
            for remote in self._remotes:
                for _ in range(self.in_flight):
                    self._request(remote, pending)
            while not self._stopping.is_set():
                if not pending:
                    self._stopping.wait(_WAIT_S)
                    continue
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=_WAIT_S)
                for ref in ready:
                    remote = pending.pop(ref)
                    if self._receive(ray, ref, remote):
                        self._request(remote, pending)
        except Exception as error:  # the cluster itself is gone: training goes on with real images
            self.lost = f"{type(error).__name__}: {error}"
            message = (f"Lost the Ray cluster feeding the onlinemix ring ({self.lost}); training continues on real "
                       "images only.")
            logger.error(message)
            warnings.warn(message, RuntimeWarning, stacklevel=1)

    def _receive(self, ray, ref, remote: _Remote) -> bool:
        """Put a finished request's batch into the ring; whether to ask the worker again."""
        try:
            batch, dropped, pid = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            remote.failures += 1
            remote.errors += 1
            logger.warning("onlinemix cluster worker %d failed (%s, %d in a row).", remote.index,
                           type(error).__name__, remote.failures)
            if isinstance(error, ray.exceptions.RayTaskError):  # its producer raised: a fresh incarnation
                ray.kill(remote.actor, no_restart=False)
            if remote.failures > self.max_restarts + self.in_flight:
                remote.gone = True
                logger.error("onlinemix cluster worker %d keeps failing; giving it up.", remote.index)
                if all(r.gone for r in self._remotes):
                    warnings.warn("Every onlinemix cluster worker has failed for good; training continues on real "
                                  "images only.", RuntimeWarning, stacklevel=1)
                return False
            time.sleep(min(0.1 * 2 ** remote.failures, 5.0))
            return True
        remote.failures = 0
        if pid not in remote.pids:
            remote.pids.append(pid)
        remote.dropped[pid] = dropped
        written = 0
        while written < len(batch) and not self._stopping.is_set():  # the ring full: the cluster waits
            written += self._writer.put(batch.images[written:], batch.source[written:], batch.target[written:],
                                        batch.strength[written:], timeout=_WAIT_S)
        remote.written += written
        return True

    # -- statistics ---------------------------------------------------------------

    def stats(self) -> dict:
        """``GeneratorPool.stats``' keys, over the remote workers (restarts: incarnations after the first that
        delivered), plus ``lost`` (why the cluster was lost, or None)."""
        now = time.monotonic()
        workers = [{
            "index": r.index, "device": "ray:gpu" if self.num_gpus > 0 else "ray:cpu",
            "alive": not r.gone and self.lost is None and r.actor is not None, "gone": r.gone,
            "restarts": max(0, len(r.pids) - 1), "written": r.written, "dropped": sum(r.dropped.values()),
            "images_per_s": r.written / (now - r.started) if r.started else 0.0, "errors": r.errors,
        } for r in self._remotes]
        return {**worker_totals(workers), "lost": self.lost}
