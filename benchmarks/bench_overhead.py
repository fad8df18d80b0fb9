"""Training-step overhead of online Diff-Mix with a live generator, and supply versus demand.

Part 1, overhead. The same timm model, data and batch size train with no
augmentation, with timm's Mixup/CutMix (its defaults: Mixup 0.8, CutMix 1.0), and
with ``DiffMix`` reading a ``SampleRing`` fed by a live generator process on
``--gen-device`` (a separate CPU process here, another GPU there). The three take
turns in blocks of ``--block`` steps for ``--rounds`` rounds, the order rotating,
so the machine's drift hits all alike. Reported: steps/s per mode, the overhead of
each mode against no augmentation (median over rounds of the paired block-time
ratio, minus 1), the realised synthetic fraction against p over the timed DiffMix
blocks, the reads-per-sample histogram, ring freshness and the generator's images/s.

The generator runs through all blocks (it waits only once every slot of the
ring holds an unread sample), so all three modes share the machine with it and the
overhead is DiffMix's own cost in the training process: ring reads, resizing,
labels. What a generator on the *same* device costs the trainer (on the CPU here:
half the cores) is not onlinemix's overhead and is not in these figures. The
demand, p·T during the DiffMix blocks, is what a run of DiffMix steps alone would
ask for; the none and Mixup blocks leave the generator two thirds of the time with
no demand, so the ring is fresher here than ``supply_ratio`` alone predicts.

Part 2, supply versus demand. Training at T samples/s with probability p asks for
p·T synthetic images/s. A generator supplying S images/s, at supply ratio
r = S/(p·T) < 1, has each sample read min(1/r, max_reuse) times on average, a
fresh-read fraction of max(r, 1/max_reuse), and below r = 1/max_reuse requests go
unserved (those samples stay real): min(1, r·max_reuse) of them are served, and the
realised fraction is p times that. A paced producer process and
a paced consumer on a real ring measure these at ratios 1/8 to 2; the plot shows
model and measurement, and the images/s p·T needs against T.

    python benchmarks/bench_overhead.py              # CPU: ResNet-18 at 64 px, the demo generator in its own process
    python benchmarks/bench_overhead.py --device cuda:0 --gen-device cuda:1 --model resnet50 --img-size 224 \\
        --batch-size 64 --gen-model sd15 --gen-resolution 512 --gen-dtype float16

Writes ``benchmarks/results/overhead_<device>.json`` and ``overhead_<device>.png``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import timm
import torch
from report import RESULTS, machine, sync, write_report
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from onlinemix import DiffMix, GeneratorPool, SampleBatch, SampleRing, one_hot, smooth_labels
from onlinemix.generator.components import sd15_architecture
from onlinemix.generator.worker import DiffMixProducer, GeneratorSpec, TensorImages
from onlinemix.pool import share_cpu_threads

MODES = ("none", "timm_mixup", "diffmix")
SMOOTHING = 0.1
# The paper's generation throughput: 4 179 Diff-Mix images per GPU-hour on an RTX 3090.
PAPER_IMAGES_PER_S = 4179 / 3600


# -- part 1: overhead --------------------------------------------------------------------------------------


def start_generator(args, ring: SampleRing, cpu_threads) -> GeneratorPool:
    """A live generator pool; diff-mix with ``--gen-finetuned``, else real-mix (the same SDEdit compute)."""
    resolution = args.gen_resolution
    references = TensorImages(
        torch.randint(0, 256, (4 * args.num_classes, 3, resolution, resolution), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0)),
        [c for c in range(args.num_classes) for _ in range(4)],
    )
    spec = GeneratorSpec(model=args.gen_model, finetuned=args.gen_finetuned,
                         strategy="diff-mix" if args.gen_finetuned else "real-mix", steps=args.gen_steps,
                         resolution=resolution, image_size=args.img_size, batch_size=args.gen_batch_size,
                         dtype=args.gen_dtype, local_files_only=True)
    factory = DiffMixProducer(spec, references, [f"class_{c}" for c in range(args.num_classes)], "bird")
    return GeneratorPool(ring, factory, [args.gen_device], cpu_threads=cpu_threads)


def training_step(model, optimizer, loss_fn):
    def step(x, y):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_block(step, transform, batches, count: int, device: torch.device) -> float:
    """Seconds for ``count`` training steps, each on a fresh copy of a batch (both mixers write in place)."""
    sync(device)
    start = time.perf_counter()
    for i in range(count):
        x, y = batches[i % len(batches)]
        step(*transform(x.clone(), y))
    sync(device)
    return time.perf_counter() - start


def overhead(args, device: torch.device) -> dict:
    cpu_threads = share_cpu_threads([args.gen_device])
    classes = args.num_classes
    model = timm.create_model(args.model, num_classes=classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = training_step(model, optimizer, SoftTargetCrossEntropy())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device),
                torch.randint(0, classes, (args.batch_size,), generator=g).to(device)) for _ in range(4)]
    with SampleRing.create(args.ring_slots, args.img_size, producers=1, consumers=1,
                           max_reuse=args.max_reuse) as ring:
        diffmix = DiffMix(p=args.p, gamma=args.gamma, source=ring, label_smoothing=SMOOTHING, num_classes=classes)
        transforms = {
            "none": lambda x, y: (x, smooth_labels(one_hot(y, classes), SMOOTHING)),
            "timm_mixup": Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=SMOOTHING, num_classes=classes),
            "diffmix": diffmix,
        }
        with start_generator(args, ring, cpu_threads) as pool:
            pool.warm_up(args.warm_samples, timeout=args.warm_timeout)
            for mode in MODES:  # kernels, allocator and autotuning settle before any timing
                time_block(step, transforms[mode], batches, args.warmup_steps, device)
            seconds = {mode: [] for mode in MODES}
            before = diffmix.stats()
            ring_before, pool_before, clock = ring.stats(), pool.stats()["written"], time.monotonic()
            for r in range(args.rounds):
                for mode in MODES[r % 3:] + MODES[:r % 3]:
                    seconds[mode].append(time_block(step, transforms[mode], batches, args.block, device))
                print(f"round {r + 1}/{args.rounds}:",
                      ", ".join(f"{m} {args.block / seconds[m][-1]:.2f} steps/s" for m in MODES), flush=True)
            after, ring_after, pool_after = diffmix.stats(), ring.stats(), pool.stats()
            elapsed = time.monotonic() - clock
    samples = after["samples"] - before["samples"]
    replaced = after["replaced"] - before["replaced"]
    steps_per_s = {m: [args.block / s for s in seconds[m]] for m in MODES}
    # Each mode's block time over none's in the same round, minus 1: drift cancels within a round.
    paired = {m: [s / n - 1 for s, n in zip(seconds[m], seconds["none"])] for m in MODES[1:]}
    diffmix_rate = statistics.median(steps_per_s["diffmix"]) * args.batch_size
    reads = ring_after["read"] - ring_before["read"]
    written = pool_after["written"] - pool_before
    generator_rate = written / elapsed
    return {
        "threads": {"trainer": torch.get_num_threads(), "generator_worker": cpu_threads},
        "steps_per_s": {m: {"median": statistics.median(v), "blocks": v} for m, v in steps_per_s.items()},
        "overhead_vs_none": {m: statistics.median(v) for m, v in paired.items()},
        "overhead_vs_none_range": {m: [min(v), max(v)] for m, v in paired.items()},
        "synthetic_fraction": {"p": args.p, "realised": replaced / samples, "samples": samples,
                               "binomial_se": float(np.sqrt(args.p * (1 - args.p) / samples)),
                               "shortfall": (after["shortfall"] - before["shortfall"])},
        "demand_images_per_s": args.p * diffmix_rate,
        "generator_images_per_s": generator_rate,
        "supply_ratio": generator_rate / (args.p * diffmix_rate),
        "ring": {"reads_timed": reads, "written_timed": written,
                 "fresh_fraction_timed": (ring_after["fresh_fraction"] * ring_after["read"]
                                          - ring_before["fresh_fraction"] * ring_before["read"]) / max(reads, 1),
                 **{k: ring_after[k] for k in ("written", "read", "fresh_fraction", "mean_age_s", "shortfall",
                                               "reads_per_sample")}},
        "generator": {k: pool_after[k] for k in ("written", "dropped", "images_per_s", "restarts", "alive")},
    }


# -- part 2: supply versus demand --------------------------------------------------------------------------


def predicted(ratio: float, max_reuse: int) -> dict:
    """The steady state at supply ratio S/(p·T), as fractions (see the module docstring)."""
    return {
        "served": min(1.0, ratio * max_reuse),
        "fresh_fraction": min(1.0, max(ratio, 1.0 / max_reuse)),
        "reads_per_sample": min(float(max_reuse), max(1.0, 1.0 / ratio)),
    }


class PacedProducer:
    """A ``GeneratorPool`` factory writing blank samples at ``rate`` images/s, never catching up on waits."""

    def __init__(self, rate: float, size: int, batch: int = 4):
        self.rate, self.size, self.batch = rate, size, batch

    def __call__(self, device):
        interval = self.batch / self.rate
        state = {"due": time.monotonic()}

        def produce():
            now = time.monotonic()
            state["due"] = max(state["due"] + interval, now)  # time spent blocked on a full ring is not owed
            time.sleep(state["due"] - now)
            return SampleBatch(torch.zeros(self.batch, 3, self.size, self.size, dtype=torch.uint8),
                               torch.zeros(self.batch, dtype=torch.long), torch.ones(self.batch, dtype=torch.long),
                               torch.full((self.batch,), 0.5))

        return produce


def paced_consumer(mix: DiffMix, batch_size: int, samples_per_s: float, seconds: float) -> None:
    x = torch.zeros(batch_size, 3, 8, 8, dtype=torch.uint8)
    y = torch.zeros(batch_size, dtype=torch.long)
    interval, due = batch_size / samples_per_s, time.monotonic()
    end = due + seconds
    while due < end:
        mix(x.clone(), y)
        due += interval
        time.sleep(max(0.0, due - time.monotonic()))


def supply_point(ratio: float, args) -> dict:
    demand = args.sim_p * args.sim_samples_per_s
    with SampleRing.create(args.sim_slots, 8, producers=1, consumers=1, max_reuse=args.max_reuse) as ring:
        mix = DiffMix(p=args.sim_p, source=ring, num_classes=2, synthetic_transform=None)
        with GeneratorPool(ring, PacedProducer(ratio * demand, 8), "cpu", cpu_threads=1) as pool:
            pool.warm_up(args.sim_slots, timeout=60, progress=False)
            # Settle: the warm stock (slots x max_reuse reads) runs out before the steady state.
            settle = args.sim_slots * args.max_reuse / demand + 1.0
            paced_consumer(mix, args.batch_size, args.sim_samples_per_s, settle)
            m0, r0, w0 = mix.stats(), ring.stats(), pool.stats()["written"]
            paced_consumer(mix, args.batch_size, args.sim_samples_per_s, args.sim_seconds)
            m1, r1, w1 = mix.stats(), ring.stats(), pool.stats()["written"]
    reads = r1["read"] - r0["read"]
    fresh = r1["fresh_fraction"] * r1["read"] - r0["fresh_fraction"] * r0["read"]
    return {
        "supply_ratio": ratio,
        "measured": {
            "served": (m1["replaced"] - m0["replaced"]) / (m1["requested"] - m0["requested"]),
            "fresh_fraction": fresh / max(reads, 1),
            "reads_per_sample": reads / max(w1 - w0, 1),
        },
        "predicted": predicted(ratio, args.max_reuse),
    }


# -- plot ---------------------------------------------------------------------------------------------------


def plot(result: dict, args, path: str) -> None:
    """Left: images/s needed against training throughput; right: model and measurement of reuse."""
    from PIL import Image, ImageDraw

    panel, height, margin = 460, 400, 60
    image = Image.new("RGB", (2 * panel + 20, height), "white")
    draw = ImageDraw.Draw(image)
    colours = [(70, 110, 190), (220, 120, 40), (60, 160, 90)]

    # Left: log-log, T in [10, 1e4] samples/s, needed images/s in [0.1, 1e4].
    def left_xy(t, s):
        x = margin + (np.log10(t) - 1) / 3 * (panel - margin - 20)
        y = height - margin - (np.log10(s) + 1) / 5 * (height - margin - 40)
        return float(x), float(y)

    for e in range(1, 5):
        x, _ = left_xy(10**e, 1)
        draw.line([x, 40, x, height - margin], fill=(230, 230, 230))
        draw.text((x - 10, height - margin + 6), f"1e{e}", fill="black")
    for e in range(-1, 5):
        _, y = left_xy(10, 10.0**e)
        draw.line([margin, y, panel - 20, y], fill=(230, 230, 230))
        draw.text((10, y - 6), f"1e{e}", fill="black")
    for colour, p in zip(colours, (0.1, 0.3, 0.5)):
        draw.line([left_xy(10, 10 * p), left_xy(1e4, 1e4 * p)], fill=colour, width=2)
        draw.text(left_xy(1e4, 1e4 * p), f"p={p}", fill=colour, anchor="rb")
    for value, label in ((PAPER_IMAGES_PER_S, "paper: 4179 img/GPU-hour (RTX 3090)"),
                         (result["overhead"]["generator_images_per_s"], "this run's generator")):
        _, y = left_xy(10, value)
        draw.line([margin, y, panel - 20, y], fill=(120, 120, 120), width=1)
        draw.text((margin + 4, y - 12), f"{label}: {value:.2f}/s", fill=(90, 90, 90))
    point = result["overhead"]
    draw.ellipse([c + d for c, d in zip(left_xy(point["demand_images_per_s"] / args.p,
                                                 point["demand_images_per_s"]) * 2, (-4, -4, 4, 4))], fill="black")
    draw.text((margin, 10), "synthetic images/s for every read to be fresh (p x T)", fill="black")
    draw.text((margin + 60, height - 24), "training throughput T (samples/s)", fill="black")

    # Right: supply ratio on log2 axis [1/8, 2], fractions in [0, 1].
    def right_xy(r, v):
        x = panel + 20 + margin + (np.log2(r) + 3) / 4 * (panel - margin - 40)
        return float(x), float(height - margin - v * (height - margin - 40))

    for e in range(-3, 2):
        x, _ = right_xy(2.0**e, 0)
        draw.line([x, 40, x, height - margin], fill=(230, 230, 230))
        draw.text((x - 10, height - margin + 6), f"{2.0**e:g}", fill="black")
    for v in np.linspace(0, 1, 6):
        _, y = right_xy(1, v)
        draw.text((panel + 30, y - 6), f"{v:.1f}", fill="black")
    ratios = np.exp2(np.linspace(-3, 1, 81))
    keys = ("served", "fresh_fraction", "reads_per_sample")
    for j, (colour, key) in enumerate(zip(colours, keys)):
        scale = args.max_reuse if key == "reads_per_sample" else 1.0
        curve = [right_xy(r, predicted(r, args.max_reuse)[key] / scale) for r in ratios]
        draw.line(curve, fill=colour, width=2)
        for row in result["supply_versus_demand"]:
            x, y = right_xy(row["supply_ratio"], row["measured"][key] / scale)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=colour, width=2)
        label = {"served": "requests served (realised fraction / p)", "fresh_fraction": "fresh share of reads",
                 "reads_per_sample": f"reads per sample / {args.max_reuse}"}[key]
        draw.text((panel + 20 + margin, 2 + 12 * j), label, fill=colour)
    draw.text((panel + 20 + margin, height - 24), "supply ratio S / (p T); lines: model, circles: measured",
              fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="the training device")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=12)
    parser.add_argument("--p", type=float, default=0.1, help="the paper's all-shot p by default")
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--gen-device", default="cpu")
    parser.add_argument("--gen-model", default="demo",
                        help="diffusers folder, hub id, 'demo', or 'sd15' (its architecture, random weights)")
    parser.add_argument("--gen-finetuned", default=None, help="personalised folder: diff-mix (default: real-mix)")
    parser.add_argument("--gen-steps", type=int, default=25)
    parser.add_argument("--gen-resolution", type=int, default=64)
    parser.add_argument("--gen-batch-size", type=int, default=12)
    parser.add_argument("--gen-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--ring-slots", type=int, default=256)
    parser.add_argument("--max-reuse", type=int, default=4)
    parser.add_argument("--warm-samples", type=int, default=64, help="samples in the ring before timing starts")
    parser.add_argument("--warm-timeout", type=float, default=600.0)
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per mode")
    parser.add_argument("--block", type=int, default=30, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sim-ratios", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75, 1.0, 2.0])
    parser.add_argument("--sim-p", type=float, default=0.3)
    parser.add_argument("--sim-samples-per-s", type=float, default=400.0, help="paced training throughput T")
    parser.add_argument("--sim-slots", type=int, default=64)
    parser.add_argument("--sim-seconds", type=float, default=10.0, help="measured seconds per supply ratio")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/overhead_<device>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    np.random.seed(0)  # DiffMix and timm's Mixup draw from NumPy's global generator

    scratch = None
    if args.gen_model == "sd15":  # Stable Diffusion 1.5's architecture with random weights: nothing to download
        scratch = tempfile.mkdtemp(prefix="onlinemix-sd15-")
        sd15_architecture(0).save(scratch)
        args.gen_model = scratch
    try:
        result = {"overhead": overhead(args, device)}
    finally:
        if scratch is not None:
            shutil.rmtree(scratch)
    print("supply versus demand:", flush=True)
    result["supply_versus_demand"] = []
    for ratio in args.sim_ratios:
        row = supply_point(ratio, args)
        result["supply_versus_demand"].append(row)
        print(f"  ratio {ratio:g}: measured", {k: round(v, 3) for k, v in row["measured"].items()},
              "model", {k: round(v, 3) for k, v in row["predicted"].items()}, flush=True)
    out = args.out or os.path.join(RESULTS, f"overhead_{device.type}.json")
    plot_path = os.path.splitext(out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    plot(result, args, plot_path)
    info = machine(device)
    info.update(timm=timm.__version__, gen_device=args.gen_device)
    write_report("bench_overhead", out, {k: v for k, v in vars(args).items() if k != "out"}, [result],
                 device=str(device), machine=info, plot=os.path.basename(plot_path))
    o = result["overhead"]
    print(", ".join(f"{m} {o['steps_per_s'][m]['median']:.2f} steps/s" for m in MODES))
    print("overhead vs none:", {m: f"{v:+.1%}" for m, v in o["overhead_vs_none"].items()},
          f"synthetic {o['synthetic_fraction']['realised']:.3f} at p {args.p}, generator "
          f"{o['generator_images_per_s']:.2f} img/s against demand {o['demand_images_per_s']:.2f}")


if __name__ == "__main__":
    main()
