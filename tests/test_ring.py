import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from onlinemix import DiffMix
from onlinemix.ring import SampleRing
from onlinemix.segments import SHM_DIR

C = 7


def samples(values, size=4):
    """Samples whose every byte is ``v`` and whose metadata is derived from ``v``."""
    v = torch.as_tensor(values, dtype=torch.int64)
    images = v.to(torch.uint8).view(-1, 1, 1, 1).expand(len(v), 3, size, size).contiguous()
    return images, v % C, (v // C) % C, (v % 10).float() / 10


def consistent(batch) -> torch.Tensor:
    """Per sample: every byte equal, and metadata matching the byte value."""
    flat = batch.images.flatten(1).long()
    v = flat[:, 0]
    return (
        (flat == v[:, None]).all(1)
        & (batch.source == v % C)
        & (batch.target == (v // C) % C)
        & torch.isclose(batch.strength, (v % 10).float() / 10)
    )


def test_put_take_roundtrip_and_diffmix_source():
    with SampleRing.create(8, 4, producers=1, consumers=2, max_reuse=1) as ring:
        producer = SampleRing.attach(ring.name, "producer", 0)
        assert producer.put(*samples([10, 11, 12])) == 3
        batch = ring.take(8)
        assert sorted(batch.images[:, 0, 0, 0].tolist()) == [10, 11, 12]
        assert consistent(batch).all()
        assert len(ring.take(8)) == 0  # max_reuse=1: all used up
        producer.put(*samples([13, 14]))
        mix = DiffMix(num_classes=C, p=1.0, gamma=0.5, source=ring, label_smoothing=0.0)
        x, target = mix(torch.zeros(4, 3, 4, 4), torch.zeros(4, dtype=torch.long))
        assert mix.stats()["replaced"] == 2 and mix.stats()["shortfall"] == 2
        torch.testing.assert_close(target.sum(1), torch.ones(4))
        stats = ring.stats()
        assert stats["written"] == 5 and stats["read"] == 5 and stats["shortfall"] == 5 + 8 + 2
        assert stats["fresh_fraction"] == 1.0
        producer.close()


def test_reuse_bound_and_histogram():
    with SampleRing.create(6, 4, producers=1, consumers=1, max_reuse=3) as ring:
        producer = SampleRing.attach(ring.name, "producer", 0)
        producer.put(*samples(range(1, 5)))
        counts, firsts = {}, []
        for _ in range(20):
            batch = ring.take(3)
            firsts += batch.images[batch.first_read, 0, 0, 0].tolist()
            for v in batch.images[:, 0, 0, 0].tolist():
                counts[v] = counts.get(v, 0) + 1
        assert counts == {1: 3, 2: 3, 3: 3, 4: 3}
        assert sorted(firsts) == [1, 2, 3, 4], "each sample's first read is marked, its rereads are not"
        stats = ring.stats()
        assert stats["reads_per_sample"][3] == 4 and stats["read"] == 12
        assert stats["fresh_fraction"] == pytest.approx(4 / 12)
        producer.close()


def test_readers_prefer_least_read_then_newest():
    with SampleRing.create(16, 4, producers=1, consumers=1, max_reuse=5) as ring:
        producer = SampleRing.attach(ring.name, "producer", 0)
        producer.put(*samples(range(1, 9)))
        assert len(ring.take(16)) == 8  # everything read once
        producer.put(*samples([100]))
        assert ring.take(1).images[0, 0, 0, 0].item() == 100  # the unread sample comes first
        # Now all are read once: draws come from the newest 2·3 of them.
        assert set(ring.take(3).images[:, 0, 0, 0].tolist()) <= {100, 8, 7, 6, 5, 4}
        producer.close()


def test_newest_first_among_unread():
    for seed in range(5):
        np.random.seed(seed)
        with SampleRing.create(16, 4, producers=1, consumers=1, max_reuse=5) as ring:
            producer = SampleRing.attach(ring.name, "producer", 0)
            producer.put(*samples(range(1, 9)))
            # Among unread samples, draws come from the newest 2·need.
            got = ring.take(2).images[:, 0, 0, 0].tolist()
            assert len(got) == 2 and set(got) <= {5, 6, 7, 8}
            producer.close()


def test_back_pressure_waits_instead_of_overwriting_fresh_samples():
    with SampleRing.create(4, 4, producers=2, consumers=1) as ring:
        producer = SampleRing.attach(ring.name, "producer", 1)  # owns slots 1 and 3
        assert producer.put(*samples([1, 2])) == 2
        start = time.monotonic()
        assert producer.put(*samples([3]), timeout=0.05) == 0
        assert time.monotonic() - start >= 0.05
        assert ring.stats()["producer_waits"] == 1
        read = ring.take(1).images[0, 0, 0, 0].item()
        assert producer.put(*samples([3]), timeout=0.05) == 1
        left = sorted(ring.take(4, timeout=0).images[:, 0, 0, 0].tolist())
        assert 3 in left and read not in left  # the read sample was the one overwritten
        producer.close()


def test_dead_writer_slot_is_skipped_then_reclaimed():
    with SampleRing.create(2, 4, producers=1, consumers=1) as ring:
        producer = SampleRing.attach(ring.name, "producer", 0)
        producer.put(*samples([5, 6]))
        producer._version[0] += 1  # as if the writer died between its two version bumps
        producer.close()
        assert ring.take(2).images[:, 0, 0, 0].tolist() == [6]
        restarted = SampleRing.attach(ring.name, "producer", 0)
        assert ring.stats()["filled"] == 1
        assert restarted.put(*samples([7])) == 1  # goes into the reclaimed slot
        assert ring.stats()["filled"] == 2
        restarted.close()


def test_pickles_as_its_name_and_attaches_lazily():
    with SampleRing.create(4, 8, producers=1, consumers=3) as ring:
        blob = pickle.dumps(ring)
        assert len(blob) < 200
        copy = pickle.loads(blob)
        assert copy.name == ring.name and copy.index is None
        producer = SampleRing.attach(ring.name, "producer", 0)
        producer.put(*samples([9], size=8))
        assert copy.take(1).images.shape == (1, 3, 8, 8)
        assert copy.index is not None
        copy.close()
        producer.close()


def test_errors_say_what_to_change():
    with pytest.raises(ValueError, match="slots .* must be at least producers"):
        SampleRing.create(1, 4, producers=2, consumers=1)
    with pytest.raises(ValueError, match="positive integer"):
        SampleRing.create(0, 4, producers=1, consumers=1)
    with pytest.raises(FileNotFoundError, match="SampleRing.create"):
        SampleRing.attach("onlinemix-does-not-exist", "consumer")
    with SampleRing.create(2, 4, producers=1, consumers=1) as ring:
        with pytest.raises(ValueError, match=r"index in \[0, 1\)"):
            SampleRing.attach(ring.name, "producer", 1)
        producer = SampleRing.attach(ring.name, "producer", 0)
        with pytest.raises(ValueError, match="resize them"):
            producer.put(*samples([1], size=8))
        with pytest.raises(ValueError, match="role='producer'"):
            ring.put(*samples([1]))
        with pytest.raises(ValueError, match="role='consumer'"):
            producer.take(1)
        ring.take(0)  # claims the only consumer index
        other = SampleRing.attach(ring.name, "consumer")
        with pytest.raises(ValueError, match="more consumers"):
            _in_child(other.take, 1)
        producer.close()


def _in_child(fn, *args):
    """Run ``fn`` in a forked child and re-raise its exception here."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def run():
        try:
            fn(*args)
            queue.put(None)
        except Exception as error:  # noqa: BLE001 - handed back to the test
            queue.put(error)

    child = ctx.Process(target=run)
    child.start()
    error = queue.get(timeout=30)
    child.join()
    if error is not None:
        raise error


def test_ring_larger_than_shm_fails_clearly_and_leaves_nothing():
    before = set(os.listdir(SHM_DIR))
    stat = os.statvfs(SHM_DIR)
    slots = (stat.f_bavail * stat.f_frsize) // (3 * 512 * 512) + 10
    with pytest.raises(ValueError, match=r"needs .* MiB .* available; use fewer slots"):
        SampleRing.create(slots, 512, producers=1, consumers=1)
    assert set(os.listdir(SHM_DIR)) == before


def test_close_twice_and_unlink():
    ring = SampleRing.create(2, 4, producers=1, consumers=1)
    path = os.path.join(SHM_DIR, ring.name)
    assert os.path.exists(path)
    ring.close()
    ring.close()
    assert not os.path.exists(path)
    with pytest.raises(ValueError, match="closed"):
        ring.take(1)


def test_owner_killed_with_sigkill_is_swept_by_next_create():
    code = (
        "import sys, time\n"
        "from onlinemix.ring import SampleRing\n"
        "ring = SampleRing.create(2, 4, producers=1, consumers=1)\n"
        "print(ring.name, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    name = child.stdout.readline().strip()
    assert name and os.path.exists(os.path.join(SHM_DIR, name))
    os.killpg(child.pid, signal.SIGKILL)  # the whole group, resource tracker included
    child.wait()
    assert os.path.exists(os.path.join(SHM_DIR, name)), "kill -9 leaves the segment behind"
    with SampleRing.create(2, 4, producers=1, consumers=1):
        assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_another_users_leftover_segment_neither_is_removed_nor_stops_a_ring(monkeypatch):
    """Another user's old, header-less ``onlinemix-*`` file: the sweep leaves it, and an unlink the
    system refuses (what a non-root user gets on another's file in sticky /dev/shm) stops nothing."""
    foreign = os.path.join(SHM_DIR, f"onlinemix-foreign-{os.getpid()}")
    with open(foreign, "wb") as f:
        f.write(b"\0" * 8)
    os.utime(foreign, (time.time() - 3600, time.time() - 3600))
    try:
        if os.getuid() == 0:
            os.chown(foreign, 54321, 54321)
            with SampleRing.create(2, 4, producers=1, consumers=1):
                assert os.path.exists(foreign), "not ours: left alone"
            os.chown(foreign, 0, 0)

        def refused(path):
            raise PermissionError(13, "Operation not permitted", path)

        monkeypatch.setattr(os, "unlink", refused)
        from onlinemix.segments import sweep_stale_segments

        assert foreign not in [os.path.join(SHM_DIR, n) for n in sweep_stale_segments()]
        monkeypatch.undo()
        assert os.path.exists(foreign)
    finally:
        os.remove(foreign)


def test_owner_sigterm_unlinks():
    code = (
        "import time\n"
        "from onlinemix.ring import SampleRing\n"
        "ring = SampleRing.create(2, 4, producers=1, consumers=1)\n"
        "print(ring.name, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    name = child.stdout.readline().strip()
    assert os.path.exists(os.path.join(SHM_DIR, name))
    child.terminate()
    assert child.wait(timeout=30) == -signal.SIGTERM
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def _torture_producer(name, index, producers, seconds):
    ring = SampleRing.attach(name, "producer", index)
    seq, end = index, time.monotonic() + seconds
    while time.monotonic() < end:
        values = [(seq + producers * k) % 251 for k in range(4)]
        seq += producers * ring.put(*samples(values, size=32), timeout=0.01)
    ring.close()


def _torture_consumer(name, seconds, queue):
    ring = SampleRing.attach(name, "consumer")
    reads = torn = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        batch = ring.take(8)
        reads += len(batch)
        torn += int((~consistent(batch)).sum())
    queue.put((reads, torn, ring.stats()["retries"]))
    ring.close()


@pytest.mark.parametrize("seconds", [3.0, pytest.param(60.0, marks=pytest.mark.slow)])
def test_torture_no_torn_reads_with_two_producers_and_two_consumers(seconds):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with SampleRing.create(16, 32, producers=2, consumers=3, max_reuse=10**9) as ring:
        procs = [ctx.Process(target=_torture_producer, args=(ring.name, i, 2, seconds)) for i in range(2)]
        procs += [ctx.Process(target=_torture_consumer, args=(ring.name, seconds, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=60) for _ in range(2)]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        stats = ring.stats()
    reads = sum(r[0] for r in results)
    torn = sum(r[1] for r in results)
    assert torn == 0
    assert reads > 300 * seconds and stats["written"] > 30 * seconds


class RingReads(Dataset):
    def __init__(self, ring):
        self.ring = ring

    def __len__(self):
        return 24

    def __getitem__(self, i):
        batch = self.ring.take(1, timeout=10.0)
        return int(batch.images[0, 0, 0, 0]), int(consistent(batch).all()), os.getpid(), self.ring.index


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.slow
def test_dataloader_workers_attach_and_read_live_data(context):
    with SampleRing.create(32, 4, producers=1, consumers=4, max_reuse=1) as ring:
        producer = SampleRing.attach(ring.name, "producer", 0)
        stop = threading.Event()

        def produce():
            value = 1
            while not stop.is_set():
                value += producer.put(*samples([value % 250 + 1]), timeout=0.01)

        writer = threading.Thread(target=produce)
        writer.start()
        try:
            loader = DataLoader(RingReads(ring), batch_size=4, num_workers=2,
                                multiprocessing_context=context)
            rows = [row for batch in loader for row in zip(*(t.tolist() for t in batch))]
        finally:
            stop.set()
            writer.join()
            producer.close()
    values, ok, pids, indices = zip(*rows)
    assert all(ok) and len(values) == 24
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert len(set(indices)) == 2, "each worker claims its own consumer index"
    # max_reuse=1 with 2 consumers: a sample may be read by both at once, never more.
    assert max(values.count(v) for v in values) <= 2
    assert len(set(values)) >= 12, "reads follow the live producer"


def test_segment_is_private_and_survives_attachers_that_exit():
    with SampleRing.create(2, 4, producers=1, consumers=2) as ring:
        path = os.path.join(SHM_DIR, ring.name)
        assert os.stat(path).st_mode & 0o777 == 0o600
        code = (
            "import sys\n"
            "from onlinemix.ring import SampleRing\n"
            "ring = SampleRing.attach(sys.argv[1], 'producer', 0)\n"
            "from tests.test_ring import samples\n"
            "ring.put(*samples([42]))\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        subprocess.run([sys.executable, "-c", code, ring.name], check=True, cwd=root)
        assert os.path.exists(path), "a process that attached and exited must not destroy the ring"
        assert ring.take(1).images[0, 0, 0, 0].item() == 42
