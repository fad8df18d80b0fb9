"""GeneratorPool: start, watch, restart and stop the generator worker processes.

Each worker is a spawned process bound to one device. It builds its producer
from a picklable factory (``factory(device) -> Producer``, the protocol in
``onlinemix.batch``: ``producer()`` returns a ``SampleBatch``, ``producer.dropped``
counts what it discarded), then writes batch after batch into the ring until
told to stop. A failing generator never stops training: the pool restarts a
crashed or hung worker with back-off up to a limit, and when every worker is gone
for good the ring simply runs dry and ``DiffMix`` keeps the real images.

Workers share no lock or queue with the training process (a ``kill -9`` of a
group would leak their semaphores): heartbeats, counters and the stop flag live
in one raw shared array, errors travel over a pipe per worker.

It is one module because the worker loop writes the shared array's columns and the
watcher reads them (heartbeat, written, waiting) to decide restarts and reports: the
two halves of that protocol change together.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from .ring import SampleRing
from .batch import Producer, ProducerFactory
from .sources import SampleRecorder

logger = logging.getLogger("onlinemix")

# Columns of the shared state, one row per worker; row 0 column 0 of the extra
# leading row is the stop flag.
_HEARTBEAT, _WRITTEN, _STARTED, _DROPPED, _WAITING, _BUSY, _UNUSED = range(7)
_COLUMNS = 7
_ENVIRONMENT_LOCK = threading.Lock()
_PUT_TIMEOUT_S = 0.2


def _on_cpu(device: str) -> bool:
    return device.split(":")[0] == "cpu"


@contextlib.contextmanager
def _started_with(environment: dict):
    """This process's environment with ``environment`` set, for a spawned child to inherit at its start,
    then as it was; one pool at a time, since the environment is the whole process's."""
    if not environment:
        yield
        return
    with _ENVIRONMENT_LOCK:
        saved = {name: os.environ.get(name) for name in environment}
        os.environ.update(environment)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _worker_main(ring_name: str, index: int, device: str, factory: ProducerFactory, state, conn,
                 parent_pid: int, seed: int, recorder: Optional[SampleRecorder], cpu_threads: Optional[int]) -> None:
    """A generator worker: build the producer, then write batches until stopped or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    # tqdm's default lock is a named semaphore (model loading draws bars); a SIGKILLed worker would leave it in
    # /dev/shm until the trainer exits, one per kill. A thread lock is all one process needs.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    if cpu_threads is not None and _on_cpu(device):
        import torch

        torch.set_num_threads(cpu_threads)
    row = np.frombuffer(state, dtype=np.float64).reshape(-1, _COLUMNS)
    stop, me = row[0], row[index + 1]

    def should_stop() -> bool:
        me[_HEARTBEAT] = time.monotonic()
        return stop[0] > 0 or os.getppid() != parent_pid

    ring = None
    try:
        np.random.seed(seed)
        me[_HEARTBEAT] = time.monotonic()
        producer = factory(device)
        if not isinstance(producer, Producer):
            raise TypeError(f"factory({device!r}) returned a {type(producer).__name__}, which is not a Producer: it "
                            "needs __call__() -> SampleBatch and a `dropped` count (onlinemix.batch.Producer).")
        ring = SampleRing.attach(ring_name, "producer", index)
        me[_STARTED] = time.monotonic()
        while not should_stop():
            if ring.fresh_allowance() == 0:  # the fresh-supply budget is spent until the trainer raises it
                time.sleep(_PUT_TIMEOUT_S)
                continue
            began = time.monotonic()
            batch = producer()
            me[_BUSY] += time.monotonic() - began
            allowance = ring.fresh_allowance()
            if allowance is not None and allowance < len(batch):
                me[_UNUSED] += len(batch) - allowance
                batch = batch.select(slice(0, allowance))
            written = 0
            while written < len(batch) and not should_stop():
                done = ring.put(batch.images[written:], batch.source[written:], batch.target[written:],
                                batch.strength[written:], timeout=_PUT_TIMEOUT_S)
                written += done
                # Since when every slot of this worker has held an unread sample (0: not waiting).
                me[_WAITING] = 0.0 if done else (me[_WAITING] or time.monotonic())
            if recorder is not None and written:
                # Numbers unique across workers and restarts: the counter lives in the pool.
                recorder.write(batch.select(slice(0, written)), first_number=index * 10**9 + int(me[_WRITTEN]))
            me[_WRITTEN] += written
            me[_DROPPED] = producer.dropped
    except BaseException:
        conn.send(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        if ring is not None:
            ring.close()
        conn.close()


def share_cpu_threads(devices: Sequence[str], workers_per_device: int = 1) -> Optional[int]:
    """Split torch's threads between this process and the generator workers on ``"cpu"``.

    By default every process starts one torch thread per core, so CPU generator
    workers and a CPU training process oversubscribe the cores (on 2 cores, 12 demo
    epochs took 119 s that way against 51 s shared). Sets this process's share and returns each
    worker's, for ``GeneratorPool(cpu_threads=...)``; None (torch's default
    everywhere) without CPU workers or when ``OMP_NUM_THREADS`` is set.
    """
    import torch

    cpu_workers = sum(map(_on_cpu, devices)) * workers_per_device
    if cpu_workers == 0 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = torch.get_num_threads()
    per_worker = max(1, cores // (cpu_workers + 1))
    torch.set_num_threads(max(1, cores - per_worker * cpu_workers))
    logger.info("CPU generator: %d torch thread(s) per generator worker, %d for this process (OMP_NUM_THREADS "
                "overrides)", per_worker, torch.get_num_threads())
    return per_worker


class GeneratorStartError(RuntimeError):
    """The generator delivered nothing during its warm-up and its workers failed: a run would silently
    train without synthetic samples."""


def fill_ring(ring: SampleRing, count: int, *, timeout: float, progress: bool, gone, errors) -> int:
    """Wait until ``ring`` holds ``count`` samples (at most its slots), ``timeout`` seconds pass or ``gone()``
    says no producer is left; the samples it holds, with a warning when short.

    Raises:
        GeneratorStartError: The ring is empty at the end and ``errors()`` holds the workers' tracebacks
            (an empty ring without errors is a slow generator: training starts, and takes what comes).
    """
    from tqdm import tqdm

    count = min(count, ring.slots)
    end = time.monotonic() + timeout
    # disable=None: drawn on a terminal only, not redrawn line after line into a log file.
    with tqdm(total=count, desc="generator warm-up", leave=False, disable=None if progress else True) as bar:
        while True:
            filled = min(ring.stats()["filled"], count)
            bar.update(filled - bar.n)
            if filled >= count or time.monotonic() >= end or gone():
                break
            time.sleep(0.2)
    failures = errors() if filled == 0 else []
    if failures:
        last = [line for line in failures[-1].strip().splitlines() if line.strip()][-1]
        raise GeneratorStartError(f"the generator delivered no sample during its warm-up and its workers failed "
                                  f"({len(failures)} error(s)), the last with: {last}")
    if filled < count:
        logger.warning("the ring holds %d of %d samples after the generator warm-up; training starts, with "
                       "real images where synthetic ones are missing", filled, count)
    return filled


def worker_totals(workers: list) -> dict:
    """A pool's statistics: its per-worker rows and their totals."""
    keys = ("written", "dropped", "images_per_s", "restarts", "alive", "busy_s", "unused")
    totals = {key: sum(w[key] for w in workers) for key in keys if all(key in w for w in workers)}
    return {"workers": workers, **totals}


@dataclass
class _Worker:
    index: int
    device: str
    process: Optional[mp.process.BaseProcess] = None
    conn: object = None
    restarts: int = 0
    failures: int = 0  # in a row: exits without a sample written since the start before
    written_at_start: float = 0.0
    restart_at: Optional[float] = None
    stall_reported: bool = False
    gone: bool = False
    errors: list = field(default_factory=list)


class GeneratorPool:
    """Generator worker processes feeding one ``SampleRing``.

    Args:
        ring: The ring (created by this, the training, process) to feed; it needs
            at least ``len(devices) * workers_per_device`` producers.
        factory: Picklable ``factory(device) -> Producer`` (``onlinemix.batch.Producer``):
            ``producer()`` returns a ``SampleBatch`` of images at the ring's size and
            ``producer.dropped`` counts what it made but did not return.
        devices: Devices to run on, e.g. ``["cuda:1", "cuda:2"]`` or ``"cpu"``.
        workers_per_device: Worker processes per device.
        max_restarts: Restarts in a row allowed per worker before it is given up; a worker that
            wrote samples since its last start begins a new count, so rare faults over a long
            run never exhaust it.
        hang_timeout: Seconds without a heartbeat after which a worker counts as
            hung and is restarted (a heartbeat comes at least every ``put`` wait).
        backoff: First restart delay in seconds, doubled per restart up to 60 s.
        seed: Base seed; worker ``i`` seeds NumPy with ``seed + 1000·i + restarts``.
        record_dir: If set, every sample written to the ring is also saved there in
            the original Diff-Mix layout (``meta.csv`` + PNGs), readable by
            ``ReplaySource``; needs ``class_names``.
        class_names: Class names in label order, for recording.
        cpu_threads: Torch threads of each worker on a ``"cpu"`` device; None: torch's
            default (every core, which oversubscribes the cores a CPU trainer also uses).
        role: What the log and warnings call a worker (``ClusterPool``'s is the Ray cluster's feeder).
        stall_report: Seconds a worker may wait for a free slot (nothing it wrote has been read)
            before the pool warns that the trainer is not reading; the worker keeps waiting.
        environment: Variables each worker process starts with, set before it imports anything
            (settings a library fixes on import, as Ray does).
    """

    def __init__(
        self,
        ring: SampleRing,
        factory: ProducerFactory,
        devices: Union[str, Sequence[str]],
        *,
        workers_per_device: int = 1,
        max_restarts: int = 5,
        hang_timeout: float = 600.0,
        backoff: float = 1.0,
        seed: int = 0,
        record_dir: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
        cpu_threads: Optional[int] = None,
        role: str = "generator worker",
        stall_report: float = 120.0,
        environment: Optional[dict] = None,
    ):
        devices = [devices] if isinstance(devices, str) else list(devices)
        if not devices:
            raise ValueError("GeneratorPool needs at least one device, e.g. 'cuda:1' or 'cpu'.")
        if workers_per_device < 1:
            raise ValueError(f"workers_per_device must be >= 1, got {workers_per_device}.")
        if not callable(factory):
            raise ValueError(f"factory must be callable as factory(device), got {type(factory).__name__}.")
        count = len(devices) * workers_per_device
        ring.stats()  # attaches, so the ring's geometry is known
        if ring.producers < count:
            raise ValueError(
                f"{count} workers need a ring with at least {count} producers, but ring {ring.name!r} has "
                f"{ring.producers}; create it with producers={count}."
            )
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 or None, got {cpu_threads}.")
        if record_dir is not None and not class_names:
            raise ValueError("record_dir needs class_names to name the recorded folders.")
        self.ring = ring
        self.factory = factory
        self.max_restarts = max_restarts
        self.hang_timeout = hang_timeout
        self.backoff = backoff
        self.seed = seed
        self.cpu_threads = cpu_threads
        self.role = role
        self.stall_report = stall_report
        self.environment = dict(environment or {})
        self.recorder = SampleRecorder(record_dir, class_names) if record_dir is not None else None
        self._ctx = mp.get_context("spawn")
        self._state = self._ctx.RawArray("d", _COLUMNS * (count + 1))
        self._rows = np.frombuffer(self._state, dtype=np.float64).reshape(-1, _COLUMNS)
        self._workers = [_Worker(i, devices[i // workers_per_device]) for i in range(count)]
        self._watcher: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._warned_all_gone = False
        self._started_at = 0.0

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> "GeneratorPool":
        """Start every worker and the watcher thread."""
        if self._watcher is not None:
            raise ValueError("GeneratorPool.start() was already called.")
        self._started_at = time.monotonic()
        for worker in self._workers:
            self._spawn(worker)
        self._watcher = threading.Thread(target=self._watch, name="onlinemix-pool-watcher", daemon=True)
        self._watcher.start()
        return self

    def warm_up(self, count: int, *, timeout: float, progress: bool = True) -> int:
        """Wait until the ring holds ``count`` samples, ``timeout`` seconds pass, or every worker is gone.

        A head start, so the first batches already find synthetic samples; training may
        start anyway (``DiffMix`` keeps real images where none are ready). Returns the
        number of samples in the ring and warns when it is short of ``count``.

        Raises:
            GeneratorStartError: Nothing arrived and the workers failed (``fill_ring``).
        """
        if self._watcher is None:
            raise ValueError("Call GeneratorPool.start() before warm_up().")
        return fill_ring(self.ring, count, timeout=timeout, progress=progress,
                         gone=lambda: all(w.gone for w in self._workers), errors=self.errors)

    def wait_started(self, timeout: float) -> None:
        """Wait until every worker has built its producer and attached to the ring.

        Raises:
            RuntimeError: A worker failed first; the message holds its traceback.
            TimeoutError: ``timeout`` seconds passed first.
        """
        if self._watcher is None:
            raise ValueError("Call GeneratorPool.start() before wait_started().")
        end = time.monotonic() + timeout
        while not all(self._rows[w.index + 1, _STARTED] > 0 for w in self._workers):
            failed = next((w for w in self._workers if w.errors), None)
            if failed is not None:
                raise RuntimeError(f"{self.role} {failed.index} on {failed.device} failed to start:\n"
                                   f"{failed.errors[0]}")
            if time.monotonic() >= end:
                raise TimeoutError(f"the generator workers did not start within {timeout:g} s.")
            time.sleep(0.1)

    def errors(self) -> list:
        """Every traceback the workers reported, worker by worker."""
        return [error for worker in self._workers for error in worker.errors]

    def _spawn(self, worker: _Worker) -> None:
        receive, send = self._ctx.Pipe(duplex=False)
        seed = self.seed + 1000 * worker.index + worker.restarts
        worker.process = self._ctx.Process(
            target=_worker_main,
            args=(self.ring.name, worker.index, worker.device, self.factory, self._state, send,
                  os.getpid(), seed, self.recorder, self.cpu_threads),
            name=f"onlinemix-generator-{worker.index}",
            daemon=True,
        )
        self._rows[worker.index + 1, _HEARTBEAT] = time.monotonic()
        self._rows[worker.index + 1, _WAITING] = 0.0
        worker.written_at_start = self._rows[worker.index + 1, _WRITTEN]
        with _started_with(self.environment):
            worker.process.start()
        send.close()
        worker.conn = receive

    def stop(self, timeout: float = 10.0) -> None:
        """Ask workers to finish, join them for ``timeout`` seconds, then terminate the rest."""
        self._stopping.set()
        self._rows[0, 0] = 1.0
        if self._watcher is not None:
            self._watcher.join()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker.process is not None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            if worker.process is not None and worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(5.0)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
            self._drain(worker)

    def __enter__(self) -> "GeneratorPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- watching -----------------------------------------------------------------

    def _drain(self, worker: _Worker) -> None:
        """Log what a worker reported over its pipe."""
        try:
            while worker.conn is not None and worker.conn.poll():
                message = worker.conn.recv()
                worker.errors.append(message)
                logger.error("onlinemix %s %d on %s failed:\n%s", self.role, worker.index, worker.device, message)
        except (EOFError, OSError):
            pass

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            now = time.monotonic()
            for worker in self._workers:
                self._check(worker, now)
            if not self._warned_all_gone and all(w.gone for w in self._workers):
                self._warned_all_gone = True
                message = (f"Every onlinemix {self.role} has failed for good; training continues on "
                           "real images only (see the errors logged above).")
                logger.error(message)
                warnings.warn(message, RuntimeWarning, stacklevel=1)

    def _check(self, worker: _Worker, now: float) -> None:
        self._drain(worker)
        if worker.gone:
            return
        if worker.restart_at is not None:
            if now >= worker.restart_at:
                worker.restart_at = None
                worker.restarts += 1
                self._spawn(worker)
            return
        process = worker.process
        if process.is_alive():
            self._report_stall(worker, now)
            if now - self._rows[worker.index + 1, _HEARTBEAT] <= self.hang_timeout:
                return
            logger.error("onlinemix %s %d on %s sent no heartbeat for %.0f s; stopping it.", self.role,
                         worker.index, worker.device, self.hang_timeout)
            process.kill()
            process.join()
            self._drain(worker)
        if self._rows[worker.index + 1, _WRITTEN] > worker.written_at_start:
            worker.failures = 0  # it delivered since its last start: a fault, not a broken generator
        if worker.failures >= self.max_restarts:
            worker.gone = True
            logger.error("onlinemix %s %d on %s exited (code %s) and failed %d times in a row without writing a "
                         "sample; giving it up.", self.role, worker.index, worker.device, process.exitcode,
                         worker.failures + 1)
            return
        delay = min(self.backoff * 2 ** worker.failures, 60.0)
        worker.failures += 1
        worker.restart_at = now + delay
        logger.warning("onlinemix %s %d on %s exited (code %s); restarting in %.1f s; the ring gets nothing from "
                       "it meanwhile.", self.role, worker.index, worker.device, process.exitcode, delay)

    def _report_stall(self, worker: _Worker, now: float) -> None:
        """Warn once per stall when a worker has waited ``stall_report`` seconds for a reader."""
        since = self._rows[worker.index + 1, _WAITING]
        if not since:
            worker.stall_reported = False
        elif now - since >= self.stall_report and not worker.stall_reported:
            worker.stall_reported = True
            logger.warning("onlinemix %s %d on %s has waited %.0f s for a free slot: nothing it wrote has been read "
                           "since. Is the trainer reading the ring? The worker keeps waiting (back-pressure).",
                           self.role, worker.index, worker.device, now - since)

    # -- statistics ---------------------------------------------------------------

    def stats(self) -> dict:
        """Per-worker images written, dropped by the producer (non-finite, filtered), images/s
        since the worker started, restarts (in all), state, process id, how long it has been waiting
        for a reader (``waiting_s``, 0 when not), seconds spent making batches (``busy_s``) and samples
        made past the ring's fresh-supply limit (``unused``)."""
        now = time.monotonic()
        workers = []
        for worker in self._workers:
            written, started = self._rows[worker.index + 1, _WRITTEN], self._rows[worker.index + 1, _STARTED]
            alive = worker.process is not None and worker.process.is_alive()
            workers.append({
                "index": worker.index,
                "device": worker.device,
                "alive": alive,
                "gone": worker.gone,
                "restarts": worker.restarts,
                "written": int(written),
                "dropped": int(self._rows[worker.index + 1, _DROPPED]),
                "images_per_s": written / (now - started) if started and alive else 0.0,
                "errors": len(worker.errors),
                "pid": worker.process.pid if worker.process is not None else None,
                "waiting_s": now - self._rows[worker.index + 1, _WAITING] if self._rows[worker.index + 1, _WAITING]
                else 0.0,
                "busy_s": float(self._rows[worker.index + 1, _BUSY]),
                "unused": int(self._rows[worker.index + 1, _UNUSED]),
            })
        return worker_totals(workers)
