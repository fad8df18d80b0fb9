"""SampleRing throughput and read latency across processes, against a plain copy.

For each image size, consumer count and ``take`` size, one producer process writes
batches of 8 into a ring while the consumer processes ``take(k)`` as fast as they
can for ``--seconds``; then one consumer times ``take(1)`` calls one by one (latency). The
same run times a single-process NumPy copy of the same bytes (the bandwidth bound).

    python benchmarks/bench_ring.py

Writes ``benchmarks/results/ring_cpu.json``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import numpy as np
import torch
from report import RESULTS, machine, write_report

from onlinemix.ring import SampleRing
BATCH = 8


def produce(name: str, size: int, seconds: float, out) -> None:
    torch.set_num_threads(1)
    ring = SampleRing.attach(name, "producer", 0)
    images = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8)
    labels = torch.zeros(BATCH, dtype=torch.long)
    strength = torch.full((BATCH,), 0.7)
    written, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        written += ring.put(images, labels, labels, strength, timeout=0.01)
    out.put(("written", written))
    ring.close()


def consume(name: str, take: int, seconds: float, out) -> None:
    torch.set_num_threads(1)
    ring = SampleRing.attach(name, "consumer")
    ring.take(0)
    read, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        read += len(ring.take(take))
    out.put(("read", read))
    ring.close()


def take_latency(ring: SampleRing, calls: int) -> list[float]:
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        got = len(ring.take(1))
        if got:
            latencies.append(time.perf_counter() - start)
    return latencies


def copy_bandwidth(size: int, slots: int, take: int, seconds: float) -> float:
    """Bytes/s of a single-process copy of ``take`` random images out of a ring-sized array.

    The same access as ``take``: fancy indexing into ``slots`` images, into a new array.
    """
    src = np.random.randint(0, 256, (slots, 3, size, size), dtype=np.uint8)
    copied, end = 0, time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < end:
        copied += src[np.random.choice(slots, take, replace=False)].nbytes
    return copied / (time.monotonic() - start)


def run(size: int, consumers: int, take: int, args) -> dict:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    sample_bytes = 3 * size * size
    with SampleRing.create(args.slots, size, producers=1, consumers=consumers + 1, max_reuse=10**6) as ring:
        procs = [ctx.Process(target=produce, args=(ring.name, size, args.seconds, out))]
        procs += [ctx.Process(target=consume, args=(ring.name, take, args.seconds, out)) for _ in range(consumers)]
        for p in procs:
            p.start()
        counts = [out.get(timeout=args.seconds + 60) for _ in procs]
        for p in procs:
            p.join()
        written = sum(n for kind, n in counts if kind == "written")
        read = sum(n for kind, n in counts if kind == "read")
        retries = ring.stats()["retries"]
        latencies = sorted(t * 1e3 for t in take_latency(ring, args.latency_calls))
    copy = copy_bandwidth(size, args.slots, take, args.seconds)
    read_bw = read * sample_bytes / args.seconds
    return {
        "image_size": size,
        "consumers": consumers,
        "take": take,
        "write_samples_per_s": written / args.seconds,
        "read_samples_per_s": read / args.seconds,
        "read_gb_per_s": read_bw / 1e9,
        "copy_gb_per_s": copy / 1e9,
        "read_fraction_of_copy": read_bw / copy,
        "take1_latency_ms": {
            "median": statistics.median(latencies),
            "p99": latencies[int(0.99 * (len(latencies) - 1))],
            "calls": len(latencies),
        },
        "torn_read_retries": retries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--take", type=int, nargs="+", default=[8, 32], help="samples per take() call")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--latency-calls", type=int, default=2000)
    parser.add_argument("--out", default=os.path.join(RESULTS, "ring_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = write_report(
        "bench_ring",
        args.out,
        {k: v for k, v in vars(args).items() if k != "out"} | {"batch": BATCH, "producers": 1},
        [run(size, consumers, take, args)
         for size in args.sizes for consumers in args.consumers for take in args.take],
        machine=machine(),
    )
    for r in report["runs"]:
        print(
            f"{r['image_size']} px, {r['consumers']} consumer(s), take({r['take']}): write {r['write_samples_per_s']:.0f}/s, "
            f"read {r['read_samples_per_s']:.0f}/s ({r['read_gb_per_s']:.2f} GB/s, "
            f"{100 * r['read_fraction_of_copy']:.0f}% of copy {r['copy_gb_per_s']:.2f} GB/s), take(1) latency "
            f"median {r['take1_latency_ms']['median']:.3f} ms, p99 {r['take1_latency_ms']['p99']:.3f} ms"
        )


if __name__ == "__main__":
    main()
