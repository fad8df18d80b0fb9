"""The network path's cost: ClusterPool's feeder against the local GeneratorPool, same producers.

Both pools run ``--workers`` workers of an instant producer (a ready batch of ``--batch``
random uint8 images at ``--size`` px, no model), so what is measured is the transport: Ray's
object store and the feeder process (Ray's driver, which the pool runs as its one worker) against a
worker process writing into shared memory itself. A reader drains the ring as fast as it can for ``--seconds``; reported are the images/s
that reached the ring and, for Ray, the round trip of one ``produce`` call (request, batch
back in this process) against calling the producer in place. Local Ray instance, CPU actors:
on a real cluster the network adds its own latency and bandwidth limit on top.

    python benchmarks/bench_cluster.py                   # 2 workers, 8 images of 224 px per batch, 20 s each

Writes ``benchmarks/results/cluster_cpu.json``.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from report import RESULTS, machine, write_report

from onlinemix import SampleBatch, SampleRing
from onlinemix.pool import GeneratorPool


class InstantProducer:
    """The same ready batch on every call: the transport is all that costs."""

    dropped = 0

    def __init__(self, device, *, batch: int, size: int):
        generator = torch.Generator().manual_seed(0)
        self.batch = SampleBatch(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator),
                                 torch.zeros(batch, dtype=torch.long), torch.ones(batch, dtype=torch.long),
                                 torch.full((batch,), 0.5))

    def __call__(self):
        return self.batch


class InstantFactory:
    def __init__(self, batch: int, size: int):
        self.batch, self.size = batch, size

    def __call__(self, device):
        return InstantProducer(device, batch=self.batch, size=self.size)


def drained(ring: SampleRing, pool, seconds: float) -> dict:
    """Images/s reaching the ring while a reader takes everything, after the pool's warm-up."""
    reader = SampleRing.attach(ring.name, "consumer", 0)
    with pool:
        pool.warm_up(ring.slots, timeout=120, progress=False)
        written = pool.stats()["written"]
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            reader.take(64, timeout=0.05)
        rate = (pool.stats()["written"] - written) / (time.perf_counter() - start)
    reader.close()
    return {"images_per_s": round(rate, 1)}


def round_trip(factory, repeats: int) -> dict:
    """Seconds per ``produce`` call through Ray (request to batch in this process) and in place."""
    import ray

    from onlinemix.cluster import GeneratorActor

    actor = ray.remote(num_cpus=1)(GeneratorActor).remote(factory, "cpu")
    ray.get(actor.produce.remote(0))
    start = time.perf_counter()
    for _ in range(repeats):
        ray.get(actor.produce.remote(0))
    remote = (time.perf_counter() - start) / repeats
    producer = factory("cpu")
    start = time.perf_counter()
    for _ in range(repeats):
        producer()
    local = (time.perf_counter() - start) / repeats
    ray.kill(actor)
    return {"ray_ms_per_call": round(remote * 1e3, 2), "in_place_ms_per_call": round(local * 1e3, 4)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default=os.path.join(RESULTS, "cluster_cpu.json"))
    args = p.parse_args(argv)

    import ray

    from onlinemix.cluster import ClusterPool

    factory = InstantFactory(args.batch, args.size)
    runs = []
    with SampleRing.create(args.slots, args.size, producers=args.workers, consumers=1) as ring:
        pool = GeneratorPool(ring, factory, ["cpu"] * args.workers, cpu_threads=1)
        runs.append({"pool": "local", **drained(ring, pool, args.seconds)})
    ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)
    try:
        with SampleRing.create(args.slots, args.size, producers=1, consumers=1) as ring:
            pool = ClusterPool(ring, factory, workers=args.workers, address=ray.get_runtime_context().gcs_address,
                               num_gpus=0)
            runs.append({"pool": "ray", **drained(ring, pool, args.seconds), **round_trip(factory, args.repeats)})
    finally:
        ray.shutdown()
    megabytes = args.batch * 3 * args.size**2 / 1e6
    for run in runs:
        run["megabytes_per_s"] = round(run["images_per_s"] * megabytes / args.batch, 1)
        print(run)
    return write_report("cluster", args.out, {**vars(args), "batch_megabytes": round(megabytes, 2)}, runs,
                        machine=machine())


if __name__ == "__main__":
    main()
