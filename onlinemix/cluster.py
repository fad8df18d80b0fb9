"""ClusterPool: generator workers as Ray actors on other machines, feeding this node's ring.

``ClusterPool`` has ``GeneratorPool``'s face (``start``, ``warm_up``, ``stop``, ``stats``, a
context manager), so the trainer and the transform see no difference. Each worker is a Ray
actor holding ``num_gpus`` GPUs (one by default; none runs it on the CPU) that builds its
producer from the same picklable factory the local pool uses and answers ``produce`` with
the next ``SampleBatch``.

The training process never talks to Ray. A feeder process, started and watched by a
one-worker ``GeneratorPool`` exactly as a local generator worker is, is Ray's driver: its
producer (``RemoteProducer``) keeps at most ``in_flight`` requests per actor outstanding and
returns whichever batch is ready first; the pool writes it into the ring before asking
again, so a full ring holds the cluster back. Ray may end a driver whose cluster stays
unreachable; that ends the feeder, never the trainer: the pool restarts it with back-off
(it reconnects and starts new actors, the old ones dying with their owner) and, past
``max_restarts``, gives it up with a loud warning while training keeps its real images.

Faults inside the cluster: Ray restarts a dead actor (``max_restarts``); a request that met
the dead one fails (``RayActorError``), the next reaches the new incarnation, which builds
its producer with the next seed. A worker that keeps failing is given up; when every worker
is, the feeder fails and the pool's restart rule takes over.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Optional

import numpy as np

from .batch import ProducerFactory, SampleBatch
from .pool import GeneratorPool, fill_ring, worker_totals
from .ring import SampleRing

logger = logging.getLogger("onlinemix")

_WAIT_S = 0.2
# ``address`` of a Ray instance the feeder starts on this machine, listening on loopback only.
LOCAL = "local"
# The environment of a feeder that starts a Ray instance for this machine alone: Ray then takes loopback
# as the node's address, and its services (GCS, raylet, workers, agents) listen there only, where with
# Ray's default they listen on every interface (anyone reaching a Ray port could run code on it). Ray
# reads this on import, and rewrites a loopback _node_ip_address to the machine's own address.
LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Columns of the feeder's shared statistics, one row per actor; they survive feeder restarts.
_WRITTEN, _DROPPED, _INCARNATIONS, _ERRORS, _GONE, _STARTED, _PID = range(7)
_COLUMNS = 7


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


def check_gpus(ray, workers: int, num_gpus: float, *, hint: str) -> None:
    """Stop when the connected cluster has fewer GPUs than ``workers`` actors of ``num_gpus`` each need (Ray
    would wait for them forever)."""
    needed = num_gpus * workers
    available = ray.cluster_resources().get("GPU", 0.0)
    if needed > available:
        raise ValueError(f"{workers} generator actors with {num_gpus:g} GPU(s) each need {needed:g} GPUs, but the "
                         f"Ray cluster has {available:g}; add GPU nodes or ask for fewer workers ({hint}).")


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


class ClusterFeed:
    """The feeder process's producer factory: ``feed(device)`` connects to Ray and starts the actors.

    Picklable (it travels to the feeder process); ``state`` is the shared statistics array
    ``ClusterPool`` reads. The arguments are ``ClusterPool``'s.
    """

    def __init__(self, factory: ProducerFactory, state, *, workers: int, address: Optional[str], num_gpus: float,
                 num_cpus: float, in_flight: int, max_restarts: int, cpu_threads: Optional[int]):
        self.factory, self.state, self.workers, self.address = factory, state, workers, address
        self.num_gpus, self.num_cpus, self.in_flight = num_gpus, num_cpus, in_flight
        self.max_restarts, self.cpu_threads = max_restarts, cpu_threads

    def __call__(self, device: str) -> "RemoteProducer":
        ray = import_ray()
        if self.address == LOCAL:
            # ClusterPool started this process with LOCAL_ONLY: Ray's node address is loopback. Ray >= 2.59
            # (what the extra requires) gives a new local instance token authentication unless RAY_AUTH_MODE
            # says otherwise.
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        module = type(self.factory).__module__
        if module in ("__main__", "__mp_main__"):  # a script's factory: actors cannot import it, so it travels whole
            ray.cloudpickle.register_pickle_by_value(sys.modules[module])
        check_gpus(ray, self.workers, self.num_gpus, hint="--gen-cluster-gpus 0 runs CPU actors")
        actor_class = ray.remote(num_gpus=self.num_gpus, num_cpus=self.num_cpus, max_restarts=self.max_restarts,
                                 max_task_retries=0)(GeneratorActor)
        actor_device = "cuda" if self.num_gpus > 0 else "cpu"
        actors = [actor_class.remote(self.factory, actor_device, self.cpu_threads) for _ in range(self.workers)]
        # The pool seeded NumPy from --seed and the feeder's restarts: a new feeder seeds new actors afresh.
        return RemoteProducer(ray, actors, self.state, base_seed=int(np.random.randint(0, 2**31 - 2**20)),
                              in_flight=self.in_flight, give_up_after=self.max_restarts + self.in_flight)


class RemoteProducer:
    """In the feeder process: the next ``SampleBatch`` of whichever actor finishes first (a ``Producer``).

    Actor ``i``'s ``k``-th incarnation seeds NumPy with ``base_seed + 1000·i + k``, as local
    worker ``i``'s ``k``-th restart does with the pool's seed.
    """

    def __init__(self, ray, actors: list, state, *, base_seed: int, in_flight: int, give_up_after: int):
        self.ray, self.actors, self.base_seed, self.give_up_after = ray, actors, base_seed, give_up_after
        self.rows = np.frombuffer(state, dtype=np.float64).reshape(-1, _COLUMNS)
        self.rows[:, _GONE] = 0.0
        self.rows[:, _STARTED] = time.monotonic()
        self.dropped_before = self.rows[:, _DROPPED].copy()  # earlier feeders' producers
        self.dropped_by_pid: list = [{} for _ in actors]
        self.pids: list = [[] for _ in actors]
        self.failures = [0] * len(actors)  # in a row
        self.pending: dict = {}
        for index in range(len(actors)):
            for _ in range(in_flight):
                self._request(index)

    @property
    def dropped(self) -> int:
        return int(sum(sum(d.values()) for d in self.dropped_by_pid))

    def _request(self, index: int) -> None:
        seed = self.base_seed + 1000 * index + len(self.pids[index])
        self.pending[self.actors[index].produce.remote(seed)] = index

    def __call__(self) -> SampleBatch:
        while True:
            if not self.pending:
                raise RuntimeError("Every onlinemix cluster worker keeps failing; the feeder gives up (see the "
                                   "warnings above) and the pool decides whether to start it again.")
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=_WAIT_S)
            for ref in ready:
                index = self.pending.pop(ref)
                batch = self._receive(ref, index)
                if batch is not None:
                    return batch

    def _receive(self, ref, index: int) -> Optional[SampleBatch]:
        """A finished request's batch (and the worker's next request), or None when it failed."""
        ray, row = self.ray, self.rows[index]
        try:
            batch, dropped, pid = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            self.failures[index] += 1
            row[_ERRORS] += 1
            logger.warning("onlinemix cluster worker %d failed (%s, %d in a row).", index, type(error).__name__,
                           self.failures[index])
            if isinstance(error, ray.exceptions.RayTaskError):  # its producer raised: a fresh incarnation
                ray.kill(self.actors[index], no_restart=False)
            if self.failures[index] > self.give_up_after:
                row[_GONE] = 1.0
                logger.error("onlinemix cluster worker %d keeps failing; giving it up.", index)
                return None
            time.sleep(min(0.1 * 2 ** self.failures[index], 5.0))
            self._request(index)
            return None
        self.failures[index] = 0
        if pid not in self.pids[index]:
            self.pids[index].append(pid)
            row[_INCARNATIONS] += 1
            row[_PID] = pid
        self.dropped_by_pid[index][pid] = dropped
        row[_DROPPED] = self.dropped_before[index] + sum(self.dropped_by_pid[index].values())
        row[_WRITTEN] += len(batch)
        self._request(index)
        return batch


class ClusterPool:
    """Ray actors generating for one ``SampleRing`` through a feeder process (``GeneratorPool``'s interface).

    Args:
        ring: The ring this process created, with one producer: the feeder.
        factory: Picklable ``factory(device) -> Producer``.
        workers: How many actors.
        address: The Ray cluster the feeder joins: ``"auto"`` (the one ``ray start`` joined this
            machine to), ``"HOST:PORT"``, ``"ray://HOST:10001"`` (Ray Client); ``"local"``: a new Ray
            instance the feeder starts on this machine, on loopback with token authentication; None:
            Ray's own choice (the instance ``ray start`` began here, else a new one on the node's address).
        num_gpus: GPUs per actor (0: a CPU actor, for tests and CPU clusters).
        num_cpus: CPUs per actor.
        in_flight: Requests outstanding per actor.
        max_restarts: Restarts Ray grants each actor, and the pool the feeder; a worker failing more
            than this plus ``in_flight`` times in a row is given up.
        seed: Base seed, as ``GeneratorPool``'s.
        cpu_threads: Torch threads of a CPU actor.
        connect_timeout: Seconds ``start`` waits for the feeder to join the cluster.
    """

    def __init__(self, ring: SampleRing, factory: ProducerFactory, *, workers: int, address: Optional[str] = None,
                 num_gpus: float = 1.0, num_cpus: float = 1.0, in_flight: int = 2, max_restarts: int = 5,
                 seed: int = 0, cpu_threads: Optional[int] = None, connect_timeout: float = 120.0):
        import_ray()
        if workers < 1 or in_flight < 1:
            raise ValueError(f"workers and in_flight must be >= 1, got {workers} and {in_flight}.")
        if num_gpus < 0 or num_cpus < 0 or max_restarts < 0:
            raise ValueError("num_gpus, num_cpus and max_restarts must be >= 0.")
        if not callable(factory):
            raise ValueError(f"factory must be callable as factory(device), got {type(factory).__name__}.")
        import multiprocessing as mp

        self.ring, self.address, self.num_gpus, self.connect_timeout = ring, address, num_gpus, connect_timeout
        self._state = mp.get_context("spawn").RawArray("d", _COLUMNS * workers)
        self._rows = np.frombuffer(self._state, dtype=np.float64).reshape(-1, _COLUMNS)
        feed = ClusterFeed(factory, self._state, workers=workers, address=address, num_gpus=num_gpus,
                           num_cpus=num_cpus, in_flight=in_flight, max_restarts=max_restarts, cpu_threads=cpu_threads)
        # The feeder only moves bytes: one torch thread leaves the cores to training.
        self._feeder = GeneratorPool(ring, feed, "cpu", max_restarts=max_restarts, seed=seed, cpu_threads=1,
                                     role="Ray cluster feeder", environment=LOCAL_ONLY if address == LOCAL else None)
        self._started = self._stopped = False

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> "ClusterPool":
        """Start the feeder and wait until it has joined the cluster and started the actors; an unreachable
        cluster or one without the GPUs asked for stops here, before any training."""
        if self._started:
            raise ValueError("ClusterPool.start() was already called.")
        check_reachable(self.address)
        self._started = True
        self._feeder.start()
        try:
            self._feeder.wait_started(self.connect_timeout)
        except (RuntimeError, TimeoutError) as error:
            self._feeder.stop()
            raise ConnectionError(f"Could not start generating on the Ray cluster at {self.address or 'local'!r}: "
                                  f"{error}") from None
        return self

    def warm_up(self, count: int, *, timeout: float, progress: bool = True) -> int:
        """As ``GeneratorPool.warm_up``: wait for ``count`` samples in the ring, at most ``timeout`` seconds."""
        if not self._started:
            raise ValueError("Call ClusterPool.start() before warm_up().")
        return fill_ring(self.ring, count, timeout=timeout, progress=progress, gone=self._gone,
                         errors=self._feeder.errors)

    def _gone(self) -> bool:
        feeder = self._feeder.stats()["workers"][0]
        return feeder["gone"] or bool(self._rows[:, _GONE].all())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the feeder; its actors end with it (Ray ends an owner's actors), the ring keeps what was written."""
        self._stopped = True
        self._feeder.stop(timeout)

    def __enter__(self) -> "ClusterPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- statistics ---------------------------------------------------------------

    def stats(self) -> dict:
        """``GeneratorPool.stats``' keys over the remote workers (restarts: incarnations after the first that
        delivered; ``pid``: the current incarnation's process on its node; no ``busy_s``), plus ``unused``
        (the feeder's), ``feeder`` (the feeder process's row) and ``lost``: why the cluster is not feeding now (the feeder's last error), or None."""
        feeder = self._feeder.stats()["workers"][0]
        now = time.monotonic()
        workers = [{
            "index": i, "device": "ray:gpu" if self.num_gpus > 0 else "ray:cpu",
            "alive": bool(feeder["alive"] and not row[_GONE] and row[_INCARNATIONS] > 0), "gone": bool(row[_GONE]),
            "restarts": int(max(0, row[_INCARNATIONS] - 1)), "written": int(row[_WRITTEN]),
            "dropped": int(row[_DROPPED]), "errors": int(row[_ERRORS]), "pid": int(row[_PID]),
            "images_per_s": row[_WRITTEN] / (now - row[_STARTED]) if row[_STARTED] and feeder["alive"] else 0.0,
        } for i, row in enumerate(self._rows)]
        lost = None
        if self._started and not self._stopped and not feeder["alive"]:
            errors = self._feeder.errors()
            lost = (errors[-1].strip().splitlines()[-1] if errors else "the feeder process exited without a "
                    "traceback, as Ray ends a driver whose cluster stays unreachable")
        # The actors' own busy time does not reach this machine; the feeder counts what the ring's limit left unused.
        return {**worker_totals(workers), "unused": feeder["unused"], "feeder": feeder, "lost": lost}
