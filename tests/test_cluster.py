"""ClusterPool on a local Ray instance (2 CPUs): CPU actors feed the ring through the feeder process, die
and come back, wait for it; a lost cluster ends the feeder, never this process."""
import contextlib
import os
import signal
import time

import numpy as np
import pytest
import torch

from onlinemix import SampleBatch, SampleRing
import train
from onlinemix.cluster import ClusterPool, check_reachable
from onlinemix.pool import GeneratorStartError

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'onlinemix[ray]')")
pytestmark = pytest.mark.slow  # a Ray instance takes seconds to start; CI runs these


class MarkedProducer:
    """Batches of 4 whose images hold the worker's seed draw and whose target counts batches."""

    def __init__(self, device):
        self.device, self.mark, self.count, self.dropped = device, int(np.random.randint(0, 250)), 0, 0

    def __call__(self):
        self.count += 1
        time.sleep(0.02)
        return SampleBatch(torch.full((4, 3, 8, 8), self.mark, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                           torch.full((4,), self.count, dtype=torch.long), torch.full((4,), 0.5))


class FailingProducer:
    dropped = 0

    def __init__(self, device):
        pass

    def __call__(self):
        raise RuntimeError("the generator broke")


@pytest.fixture(scope="module")
def address():
    """A Ray instance this test process starts; the feeders join it by its address, as a training node joins its
    cluster."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def wait_for(condition, timeout=240.0):
    # Generous: Ray actors start in seconds here, in minutes on a starved machine (two busy loops on 2 cores).
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


def test_actors_feed_the_ring_through_the_feeder(address):
    with SampleRing.create(64, 8, producers=1, consumers=1) as ring:
        with ClusterPool(ring, MarkedProducer, workers=2, address=address, num_gpus=0, seed=3) as pool:
            assert pool.warm_up(32, timeout=240, progress=False) == 32
            reader = SampleRing.attach(ring.name, "consumer", 0)
            batch = reader.take(32)
            def both_actors_wrote():
                # Keep reading: a second actor that starts late finds a ring the first one has filled again, and
                # its batch reaches the ring (and its count) only once a slot is free.
                reader.take(16)
                return all(w["written"] > 0 for w in pool.stats()["workers"])
            wait_for(both_actors_wrote)
            reader.close()
            stats = pool.stats()
        assert len(batch) == 32 and set(batch.strength.tolist()) == {0.5}
        base = np.random.RandomState(3).randint(0, 2**31 - 2**20)  # the feeder's draw, seeded as worker 0
        marks = {np.random.RandomState(base + 1000 * w).randint(0, 250) for w in range(2)}
        assert set(batch.images[:, 0, 0, 0].tolist()) <= marks, "actor i seeded with base + 1000 i"
        assert stats["written"] >= 32 and stats["alive"] == 2 and stats["lost"] is None
        assert stats["feeder"]["alive"] and stats["feeder"]["pid"] != os.getpid(), "Ray's driver is the feeder"


def test_a_full_ring_holds_the_cluster_back(address):
    with SampleRing.create(8, 8, producers=1, consumers=1) as ring:
        with ClusterPool(ring, MarkedProducer, workers=2, address=address, num_gpus=0, in_flight=1) as pool:
            pool.warm_up(8, timeout=240, progress=False)
            time.sleep(2.0)  # no reader: every slot stays fresh
            held = pool.stats()["written"]
            time.sleep(1.0)
            assert ring.stats()["filled"] == 8 and pool.stats()["written"] == held <= 8 + 4 * 3, \
                "the feeder holds one batch and each actor one request; nothing more is asked for"


def test_a_killed_actor_is_replaced_and_feeding_goes_on(address):
    with SampleRing.create(16, 8, producers=1, consumers=1) as ring:
        reader = SampleRing.attach(ring.name, "consumer", 0)
        with ClusterPool(ring, MarkedProducer, workers=1, address=address, num_gpus=0, max_restarts=3) as pool:
            wait_for(lambda: pool.stats()["written"] >= 8)
            os.kill(pool.stats()["workers"][0]["pid"], signal.SIGKILL)
            def restarted():
                reader.take(16)
                return pool.stats()["restarts"] >= 1
            wait_for(restarted)
            before = pool.stats()["written"]
            wait_for(lambda: reader.take(16) is not None and pool.stats()["written"] > before + 8)
            stats = pool.stats()
        reader.close()
        assert stats["restarts"] == 1 and stats["workers"][0]["errors"] >= 1 and not stats["workers"][0]["gone"]


def test_a_worker_that_keeps_failing_is_given_up_without_stopping_the_trainer(address):
    with SampleRing.create(8, 8, producers=1, consumers=1) as ring:
        with ClusterPool(ring, FailingProducer, workers=1, address=address, num_gpus=0, max_restarts=0,
                         in_flight=1) as pool:
            with pytest.warns(RuntimeWarning, match="failed for good"):
                wait_for(lambda: pool.stats()["feeder"]["gone"])
            stats = pool.stats()
            assert stats["workers"][0]["errors"] >= 2 and "keeps failing" in stats["lost"]
            with pytest.raises(GeneratorStartError, match="keeps failing|the generator broke"):
                pool.warm_up(4, timeout=1, progress=False)  # at a run's start: it stops, saying why


def test_losing_the_cluster_ends_the_feeder_not_this_process(monkeypatch):
    """The feeder starts its own Ray instance (address None); killing its GCS is the head node going away. Ray
    ends a driver whose GCS stays unreachable for gcs_rpc_server_reconnect_timeout_s (60 s, here 3 s)."""
    psutil = pytest.importorskip("psutil")
    monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", "3")
    with SampleRing.create(16, 8, producers=1, consumers=1) as ring:
        reader = SampleRing.attach(ring.name, "consumer", 0)
        with ClusterPool(ring, MarkedProducer, workers=1, num_gpus=0, max_restarts=0) as pool:
            wait_for(lambda: reader.take(16) is not None and pool.stats()["written"] >= 16)
            family = psutil.Process(pool.stats()["feeder"]["pid"]).children(recursive=True)
            next(p for p in family if "gcs_server" in p.name()).kill()
            with pytest.warns(RuntimeWarning, match="Every onlinemix Ray cluster feeder has failed for good; training "
                                                    "continues on real images only"):
                wait_for(lambda: pool.stats()["feeder"]["gone"])
            assert "without a traceback" in pool.stats()["lost"] and pool.stats()["alive"] == 0
            written = ring.stats()["written"]
            for _ in range(8):
                reader.take(16)
            assert len(reader.take(16)) == 0 and ring.stats()["written"] == written, \
                "the ring runs dry: real images from here on, and this process goes on"
        reader.close()
    for process in family:  # Ray's node agents outlive a lost head; a real node's would be restarted by `ray start`
        if process.is_running():
            process.kill()


def test_a_local_cluster_listens_on_loopback_only_and_asks_for_a_token(tmp_path, monkeypatch):
    """``--gen-cluster local``: every port the feeder's Ray instance opens is bound to loopback, so no other
    machine can reach Ray (which runs whatever code a caller sends it), and it takes requests only with the
    token ray.init generates, on a machine that has none yet (a fresh home)."""
    psutil = pytest.importorskip("psutil")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with SampleRing.create(16, 8, producers=1, consumers=1) as ring:
        reader = SampleRing.attach(ring.name, "consumer", 0)
        with ClusterPool(ring, MarkedProducer, workers=1, address="local", num_gpus=0, max_restarts=0) as pool:
            wait_for(lambda: reader.take(16) is not None and pool.stats()["written"] >= 16)
            feeder = psutil.Process(pool.stats()["feeder"]["pid"])
            listening = {}
            for process in [feeder, *feeder.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    listening[process.name()] = sorted({c.laddr.ip for c in process.net_connections(kind="inet")
                                                        if c.status == psutil.CONN_LISTEN})
        reader.close()
    assert any("gcs_server" in name for name in listening) and any(listening.values()), "Ray's services were seen"
    assert {ip for ips in listening.values() for ip in ips} <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, repr(listening)
    assert (tmp_path / ".ray" / "auth_token").is_file(), "token authentication was on"


def test_bad_settings_are_refused(address):
    with SampleRing.create(8, 8, producers=1, consumers=1) as ring:
        with pytest.raises(ConnectionError, match="need 4 GPUs, but the Ray cluster has 0;"):
            ClusterPool(ring, MarkedProducer, workers=4, address=address, num_gpus=1).start()
        with pytest.raises(ValueError, match="workers and in_flight must be >= 1"):
            ClusterPool(ring, MarkedProducer, workers=0)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_cluster_stops_before_any_work(data_dir):
    address = f"127.0.0.1:{closed_port()}"
    with pytest.raises(ConnectionError, match="Nothing answers at the Ray cluster address"):
        check_reachable(f"ray://{address}")
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        check_reachable("a cluster")
    with pytest.raises(ConnectionError, match="ray start --head"):
        train.parse_args(["--data-dir", data_dir, "--device", "cpu", "--aug", "diffmix", "--gen-cluster", address])


def test_train_generates_on_the_cluster(base, data_dir, tmp_path):
    result = train.main(["--data-dir", data_dir, "--output", str(tmp_path), "--name", "run", "--model", "resnet18",
                         "--img-size", "32", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu",
                         "--aug", "realaug", "--gen-cluster", "local", "--gen-cluster-gpus", "0", "--gen-model", base,
                         "--gen-resolution", "32", "--gen-steps", "4", "--gen-batch-size", "4", "--ring-slots", "16",
                         "--p", "0.5", "--gen-warmup", "300"])
    assert result["augmentation"]["replaced"] > 0
    assert result["generator"]["written"] > 0 and result["generator"]["workers"][0]["device"] == "ray:cpu"
