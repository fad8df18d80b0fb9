"""What every benchmark records besides its timings: when, where, with what."""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine(device: Optional[torch.device] = None) -> dict:
    """CPU model, cores, threads, library versions and the GPU's name when one is used."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, *, warmup: int, steps: int, batch: int, device: torch.device, precision: str,
                parameters) -> dict:
    """Time an optimisation ``step(k) -> loss`` (``warmup`` untimed calls, then ``steps`` timed): the row a
    training-step benchmark reports, with the peak GPU memory of the timed steps on a GPU."""
    import statistics
    import time

    for k in range(warmup):
        step(k)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for k in range(steps):
        sync(device)
        start = time.perf_counter()
        loss = step(warmup + k)
        sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    row = {"precision": precision, "median_step_s": round(median, 4), "steps_per_s": round(1 / median, 3),
           "images_per_s": round(batch / median, 2), "last_loss": round(loss, 5),
           "trainable_parameters": sum(p.numel() for p in parameters)}
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(row)
    return row


def write_report(name: str, path: str, settings: dict, runs: list, **extra) -> dict:
    """Write ``{benchmark, date, machine, settings, runs}`` as JSON to ``path``."""
    report = {
        "benchmark": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
        "settings": settings,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    return report


def pyplot():
    """matplotlib's pyplot on the file-only backend; a clear error without the ``bench`` extra."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("The benchmarks draw their plots with matplotlib: pip install -e '.[bench]'.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
