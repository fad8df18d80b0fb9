"""Time one call of DiffMix against timm's Mixup with the same CutMix settings.

Three transforms are timed: timm's Mixup, DiffMix with ``--p``, and DiffMix with
p = 0 (the same CutMix, no replacement; DiffMix flips only the CutMix box where
timm flips the whole batch, which the p = 0 row shows on its own).

Both transforms see the same batches, interleaved call by call so that drift of
the machine hits both alike. DiffMix replaces each sample with probability
``--p`` from an in-memory pool whose images are ``--source-size`` pixels (224:
no resize needed; 512: the generator's native size, resized on the fly).

    python benchmarks/bench_transform.py                    # CPU, the issue's settings
    python benchmarks/bench_transform.py --device cuda      # on a GPU

Writes ``benchmarks/results/transform_<device>.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import timm
import torch
from report import RESULTS, machine, sync, write_report
from timm.data import Mixup

from onlinemix import DiffMix, RandomResizedCropFlip, TensorSource


def time_call(fn, x, y, device) -> float:
    x = x.clone()
    sync(device)
    start = time.perf_counter()
    fn(x, y)
    sync(device)
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    return {
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "p10_ms": ms[len(ms) // 10],
        "p90_ms": ms[(9 * len(ms)) // 10],
    }


def run(source_size: int, args, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    pool = TensorSource(
        torch.randint(0, 256, (args.pool, 3, source_size, source_size), dtype=torch.uint8, generator=g),
        torch.randint(0, args.num_classes, (args.pool,), generator=g),
        torch.randint(0, args.num_classes, (args.pool,), generator=g),
        torch.tensor([0.5, 0.7, 0.9])[torch.randint(0, 3, (args.pool,), generator=g)],
    )
    mix_args = dict(cutmix_alpha=args.cutmix, prob=1.0, label_smoothing=0.1, num_classes=args.num_classes)
    methods = {
        "timm_mixup": Mixup(mixup_alpha=0.0, **mix_args),
        # Synthetic images get the training crop and flip, resized once to the batch's size, as train.py does.
        "diffmix": DiffMix(**mix_args, p=args.p, gamma=0.5, source=pool,
                           synthetic_transform=RandomResizedCropFlip(size=args.img_size)),
        # The same CutMix without replacement: separates the cost of the swap from
        # the difference between the two CutMix implementations.
        "diffmix_p0": DiffMix(**mix_args, p=0.0),
    }
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    times = {name: [] for name in methods}
    for step in range(args.warmup + args.calls):
        for name, fn in methods.items():
            np.random.seed(step)
            elapsed = time_call(fn, x, y, device)
            if step >= args.warmup:
                times[name].append(elapsed)
    stats = methods["diffmix"].stats()
    result = {name: summary(t) for name, t in times.items()}
    result.update(
        source_size=source_size,
        ratio_of_medians=result["diffmix"]["median_ms"] / result["timm_mixup"]["median_ms"],
        replacement_cost_ms=result["diffmix"]["median_ms"] - result["diffmix_p0"]["median_ms"],
        realised_synthetic_fraction=stats["replaced_fraction"],
    )
    result["meets_target_1.5x"] = result["ratio_of_medians"] <= 1.5
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--source-size", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--cutmix", type=float, default=1.0)
    parser.add_argument("--pool", type=int, default=256, help="synthetic images in the in-memory pool")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per transform")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/transform_<device>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)

    info = machine(device)
    info["timm"] = timm.__version__
    report = write_report(
        "bench_transform",
        args.out or os.path.join(RESULTS, f"transform_{device.type}.json"),
        {k: v for k, v in vars(args).items() if k != "out"},
        [run(size, args, device) for size in args.source_size],
        device=str(device),
        machine=info,
    )
    for r in report["runs"]:
        print(
            f"source {r['source_size']} px: timm Mixup {r['timm_mixup']['median_ms']:.2f} ms, "
            f"DiffMix {r['diffmix']['median_ms']:.2f} ms, DiffMix p=0 {r['diffmix_p0']['median_ms']:.2f} ms "
            f"(medians per call), ratio {r['ratio_of_medians']:.2f}, "
            f"synthetic fraction {r['realised_synthetic_fraction']:.3f}"
        )


if __name__ == "__main__":
    main()
