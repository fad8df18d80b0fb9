import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from onlinemix import DiffMix, GeneratorPool, ReplayProducerFactory, ReplaySource, SampleRing
from onlinemix.pool import GeneratorStartError, share_cpu_threads
from onlinemix.segments import SHM_DIR
from tests.helpers import Counting, DeliversThenCrashes, DrawsABar, Failing, Halving, Hanging, ThreadCount
from tests.test_sources import CLASSES, ROWS, write_offline_output


def wait_for(condition, seconds=60.0, step=0.05):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(step)
    return False


def worker_pids(pool):
    return [w.process.pid for w in pool._workers if w.process is not None and w.process.is_alive()]


def test_workers_fill_the_ring_and_stop_cleanly():
    with SampleRing.create(32, 8, producers=2, consumers=2, max_reuse=1) as ring:
        with GeneratorPool(ring, Counting(size=8), ["cpu"], workers_per_device=2) as pool:
            assert wait_for(lambda: pool.stats()["written"] == 32)  # full: back-pressure holds the rest
            batch = ring.take(16, timeout=30)
            assert len(batch) == 16
            flat = batch.images.flatten(1)
            assert (flat == flat[:, :1]).all() and flat.min() >= 1
            assert len(set(batch.source.tolist())) == 2, "both workers wrote"
            stats = pool.stats()
            assert stats["alive"] == 2 and stats["restarts"] == 0 and stats["images_per_s"] > 0
            pids = worker_pids(pool)
        assert all(not w.process.is_alive() for w in pool._workers)
        assert all(w.process.exitcode == 0 for w in pool._workers), "workers left on the stop flag"
        assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                       for pid in pids)


def test_killed_worker_is_restarted_and_reads_go_on():
    with SampleRing.create(16, 8, producers=1, consumers=1, max_reuse=1) as ring:
        with GeneratorPool(ring, Counting(size=8), "cpu", backoff=0.1) as pool:
            assert len(ring.take(4, timeout=60)) == 4
            os.kill(worker_pids(pool)[0], signal.SIGKILL)
            assert wait_for(lambda: pool.stats()["restarts"] == 1 and pool.stats()["alive"] == 1)
            before = pool.stats()["written"]
            # max_reuse=1 and at most 16 unread samples: 32 reads need new writes.
            assert sum(len(ring.take(8, timeout=30)) for _ in range(4)) == 32
            assert pool.stats()["written"] >= before + 16


def test_a_killed_worker_leaves_no_semaphore_in_dev_shm():
    def semaphores():
        return {n for n in os.listdir(SHM_DIR) if n.startswith("sem.")}

    before = semaphores()
    with SampleRing.create(16, 8, producers=1, consumers=1) as ring:
        with GeneratorPool(ring, DrawsABar(size=8), "cpu", backoff=0.0) as pool:
            assert wait_for(lambda: pool.stats()["written"] > 0)
            assert semaphores() == before, "the worker's progress bars take no named semaphore"
            os.kill(worker_pids(pool)[0], signal.SIGKILL)
            assert wait_for(lambda: pool.stats()["restarts"] == 1 and pool.stats()["written"] > 0)
            assert semaphores() == before


@pytest.mark.slow
def test_restarts_count_in_a_row_so_a_worker_that_delivers_is_never_given_up():
    with SampleRing.create(64, 8, producers=1, consumers=1, max_reuse=1) as ring:
        with GeneratorPool(ring, DeliversThenCrashes(), "cpu", max_restarts=1, backoff=0.0) as pool:
            assert wait_for(lambda: pool.stats()["restarts"] >= 3, 90)
            stats = pool.stats()
        assert not stats["workers"][0]["gone"] and stats["written"] >= 3 * 4


@pytest.mark.slow
def test_a_ring_nobody_reads_holds_producers_in_bounded_memory_and_the_stall_is_reported(caplog):
    psutil = pytest.importorskip("psutil")
    caplog.set_level(logging.WARNING, logger="onlinemix")
    with SampleRing.create(16, 64, producers=1, consumers=1) as ring:
        with GeneratorPool(ring, Counting(size=64), "cpu", hang_timeout=3.0, stall_report=1.0) as pool:
            assert wait_for(lambda: pool.stats()["written"] == 16)
            # A worker slow to boot (spawn and imports on a loaded machine) may be restarted once; only what
            # follows the full ring counts.
            restarts = pool.stats()["restarts"]
            worker = psutil.Process(worker_pids(pool)[0])
            time.sleep(1.0)
            rss = worker.memory_info().rss
            time.sleep(5.0)  # the producer could make thousands of batches meanwhile; the ring takes none
            stats = pool.stats()
            assert worker.memory_info().rss - rss < 4 * 2**20, "back-pressure: no batch piles up in the worker"
            assert stats["written"] == 16 and stats["restarts"] == restarts, "waiting is not hanging: heartbeats go on"
            assert stats["workers"][0]["waiting_s"] > 4.0 > pool.hang_timeout
            assert "has waited" in caplog.text and "Is the trainer reading the ring?" in caplog.text
            ring.take(16)
            assert wait_for(lambda: pool.stats()["written"] > 16, 30), "writing resumes once samples are read"


def test_failing_generator_logs_traceback_gives_up_and_training_goes_on(caplog):
    caplog.set_level(logging.WARNING, logger="onlinemix")
    with SampleRing.create(8, 8, producers=1, consumers=1) as ring:
        pool = GeneratorPool(ring, Failing(), "cpu", max_restarts=1, backoff=0.0)
        with pytest.warns(RuntimeWarning, match="continues on real images"):
            pool.start()
            assert wait_for(lambda: all(w.gone for w in pool._workers))
            assert wait_for(lambda: pool._warned_all_gone, 5)
        pool.stop()
        assert "no generator on cpu today" in caplog.text and "Traceback" in caplog.text
        assert pool.stats()["restarts"] == 1
        mix = DiffMix(num_classes=7, p=1.0, source=ring)
        x = torch.zeros(4, 3, 8, 8)
        out, target = mix(x.clone(), torch.zeros(4, dtype=torch.long))
        assert torch.equal(out, x) and mix.stats()["shortfall"] == 4


@pytest.mark.slow
def test_wait_started_returns_once_workers_run_and_raises_a_start_failure():
    with SampleRing.create(8, 8, producers=1, consumers=1) as ring:
        with pytest.raises(ValueError, match="Call GeneratorPool.start"):
            GeneratorPool(ring, Counting(size=8), "cpu").wait_started(1)
        with GeneratorPool(ring, Counting(size=8), "cpu") as pool:
            pool.wait_started(60)
            assert pool.stats()["workers"][0]["pid"] == worker_pids(pool)[0]
        pool = GeneratorPool(ring, Failing(), "cpu", max_restarts=0).start()
        with pytest.raises(RuntimeError, match="(?s)worker 0 on cpu failed to start:.*no generator on cpu today"):
            pool.wait_started(60)
        assert len(pool.errors()) == 1 and "Traceback" in pool.errors()[0]
        pool.stop()
        with GeneratorPool(ring, Counting(size=8, delay=0.0), "cpu") as pool:
            with pytest.raises(TimeoutError, match="did not start within 0 s"):
                pool.wait_started(0)


def test_hung_worker_is_restarted(caplog):
    caplog.set_level(logging.WARNING, logger="onlinemix")
    with SampleRing.create(8, 8, producers=1, consumers=1) as ring:
        with GeneratorPool(ring, Hanging(), "cpu", hang_timeout=1.0, backoff=0.0, max_restarts=3) as pool:
            assert wait_for(lambda: pool.stats()["restarts"] >= 1)
        assert "no heartbeat" in caplog.text


@pytest.mark.slow
def test_workers_exit_when_the_training_process_dies():
    code = (
        "import time\n"
        "from onlinemix import GeneratorPool, SampleRing\n"
        "from tests.helpers import Counting\n"
        "ring = SampleRing.create(8, 8, producers=1, consumers=1)\n"
        "pool = GeneratorPool(ring, Counting(size=8, delay=0.05), 'cpu').start()\n"
        "while pool.stats()['written'] == 0: time.sleep(0.05)\n"
        "print(ring.name, pool._workers[0].process.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    name, pid = child.stdout.readline().split()
    child.kill()
    child.wait()
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30), "an orphaned worker must exit"
    with SampleRing.create(2, 4, producers=1, consumers=1):  # sweeps the dead owner's segment
        assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_replay_producer_serves_an_offline_directory_and_recording_round_trips(tmp_path):
    write_offline_output(tmp_path / "offline", ROWS)
    factory = ReplayProducerFactory(tmp_path / "offline", CLASSES, size=8, batch_size=4)
    with SampleRing.create(8, 8, producers=1, consumers=1, max_reuse=1) as ring:
        with GeneratorPool(ring, factory, "cpu", record_dir=str(tmp_path / "recorded"), class_names=CLASSES) as pool:
            batch = ring.take(8, timeout=60)
            assert wait_for(lambda: pool.stats()["written"] >= 8)
    assert len(batch) == 8
    numbers = (batch.images[:, 0, 4, 4].long() // 10).tolist()
    meta = {number: (CLASSES.index(s), CLASSES.index(t)) for s, t, number, _ in ROWS}
    assert [meta[n] for n in numbers] == list(zip(batch.source.tolist(), batch.target.tolist()))

    recorded = ReplaySource(tmp_path / "recorded", CLASSES, size=8)
    assert len(recorded) >= 8
    again = recorded.take(16)
    numbers = (again.images[:, 0, 4, 4].long() // 10).tolist()
    assert [meta[n] for n in numbers] == list(zip(again.source.tolist(), again.target.tolist()))


def test_pool_errors():
    with SampleRing.create(4, 8, producers=1, consumers=1) as ring:
        with pytest.raises(ValueError, match="producers=2"):
            GeneratorPool(ring, Counting(), ["cpu", "cpu"])
        with pytest.raises(ValueError, match="at least one device"):
            GeneratorPool(ring, Counting(), [])
        with pytest.raises(ValueError, match="class_names"):
            GeneratorPool(ring, Counting(), "cpu", record_dir="/tmp/x")
        with pytest.raises(ValueError, match="cpu_threads"):
            GeneratorPool(ring, Counting(), "cpu", cpu_threads=0)


def test_cpu_workers_take_their_thread_share():
    share = torch.get_num_threads() + 1  # unlike the default, so the test sees it arrive
    with SampleRing.create(8, 8, producers=1, consumers=1) as ring:
        with GeneratorPool(ring, ThreadCount(), "cpu", cpu_threads=share):
            assert ring.take(4, timeout=60).source.tolist() == [share] * 4


def test_ctrl_c_stops_everything_cleanly():
    code = (
        "import signal, time\n"
        # A terminal's foreground job has Ctrl-C's default handler; a test run launched as a background
        # job of a non-interactive shell inherits SIGINT ignored, which would hide what is tested here.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from onlinemix import GeneratorPool, SampleRing\n"
        "from tests.helpers import Counting\n"
        "with SampleRing.create(8, 8, producers=1, consumers=1) as ring:\n"
        "    with GeneratorPool(ring, Counting(size=8), 'cpu') as pool:\n"
        "        ring.take(1, timeout=60)\n"
        "        print(ring.name, pool._workers[0].process.pid, flush=True)\n"
        "        while True:\n"
        "            ring.take(4, timeout=0.1)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    name, pid = child.stdout.readline().split()
    os.killpg(child.pid, signal.SIGINT)  # what a terminal sends to the whole foreground group
    _, err = child.communicate(timeout=60)
    assert err.count("KeyboardInterrupt") == 1, err  # the training process's own, no worker's
    assert "onlinemix generator worker" not in err
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10)


def test_samples_a_producer_drops_are_reported():
    with SampleRing.create(32, 8, producers=1, consumers=1) as ring:
        with GeneratorPool(ring, Halving(), "cpu") as pool:
            assert wait_for(lambda: pool.stats()["written"] >= 8)
            stats = pool.stats()
    assert stats["dropped"] >= stats["written"] - 2  # half of every batch of 4 is dropped
    assert stats["workers"][0]["dropped"] == stats["dropped"]


@pytest.mark.filterwarnings("ignore:Every onlinemix generator worker has failed")
def test_warm_up_waits_for_samples_and_gives_up_when_every_worker_is_gone(caplog):
    with SampleRing.create(16, 8, producers=1, consumers=1) as ring:
        pool = GeneratorPool(ring, Counting(size=8), "cpu")
        with pytest.raises(ValueError, match="start"):
            pool.warm_up(4, timeout=1)
        with pool:
            assert pool.warm_up(12, timeout=120, progress=False) == 12
            assert ring.stats()["filled"] >= 12
            assert pool.warm_up(100, timeout=120, progress=False) == 16, "never more than the ring holds"
    with SampleRing.create(16, 8, producers=1, consumers=1) as ring:
        with GeneratorPool(ring, Failing(), "cpu", max_restarts=0) as pool:
            started = time.monotonic()
            with pytest.raises(GeneratorStartError, match="delivered no sample .* the last with: RuntimeError"):
                pool.warm_up(4, timeout=300, progress=False)
            assert time.monotonic() - started < 120, "stopped waiting once every worker was gone"
    with SampleRing.create(16, 8, producers=1, consumers=1) as ring:
        with GeneratorPool(ring, Counting(size=8, delay=60), "cpu") as pool, caplog.at_level(logging.WARNING):
            assert pool.warm_up(4, timeout=1, progress=False) == 0, "slow, not failed: training may start"
    assert "training starts, with real images" in caplog.text


@pytest.mark.parametrize("devices, per_device, expected", [(["cpu"], 1, (2, 2)), (["cpu"], 2, (1, 2)),
                                                           (["cuda:1"], 1, (None, 4)), (["cpu", "cuda:1"], 1, (2, 2))])
def test_cpu_generator_workers_and_the_trainer_share_the_cores(devices, per_device, expected, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert (share_cpu_threads(devices, per_device), torch.get_num_threads()) == expected
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert (share_cpu_threads(devices, per_device), torch.get_num_threads()) == (None, 4), "the user's setting wins"
    finally:
        torch.set_num_threads(before)
