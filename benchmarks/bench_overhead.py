"""Training-step overhead of online Diff-Mix with a live generator, and supply versus demand.

Part 1, overhead. The same timm model, data and batch size train with no
augmentation, with timm's Mixup/CutMix (its defaults: Mixup 0.8, CutMix 1.0), and
with ``DiffMix`` reading a ``SampleRing`` fed by a live generator process on
``--gen-device`` (a separate CPU process here, another GPU there), and with ``DiffMix``
plus the closed loop's trainer side (``diffmix_loop``: the confusion tracked from each
step's logits, published to a ``FeedbackBlock`` every 20 steps). The four take
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
from report import RESULTS, machine, pyplot, sync, write_report
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from sd15 import sd15_architecture

from onlinemix import DiffMix, GeneratorPool, SampleBatch, SampleRing, one_hot, smooth_labels
from onlinemix.augmentation import create_ring_and_pool
from onlinemix.data import FileSplit
from onlinemix.feedback import ClosedLoop, FeedbackBlock
from onlinemix.generator.worker import DiffusionProducerFactory, GeneratorSpec

MODES = ("none", "timm_mixup", "diffmix", "diffmix_loop")
FEEDBACK_EVERY = 20
SMOOTHING = 0.1
# The paper's generation throughput: 4 179 Diff-Mix images per GPU-hour on an RTX 3090.
PAPER_IMAGES_PER_S = 4179 / 3600


# -- part 1: overhead --------------------------------------------------------------------------------------


def start_generator(args, work_dir: str):
    """A ring and a live generator pool; diffmix with ``--gen-finetuned``, else realmix (the same SDEdit
    compute), translating random reference images written to ``work_dir``."""
    from PIL import Image

    resolution, g = args.gen_resolution, np.random.default_rng(0)
    paths, labels = [], [c for c in range(args.num_classes) for _ in range(4)]
    for i in range(len(labels)):
        paths.append(os.path.join(work_dir, f"{i}.png"))
        Image.fromarray(g.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(paths[-1])
    spec = GeneratorSpec(model=args.gen_model, finetuned=args.gen_finetuned,
                         strategy="diffmix" if args.gen_finetuned else "realmix", steps=args.gen_steps,
                         resolution=resolution, image_size=args.img_size, batch_size=args.gen_batch_size,
                         dtype=args.gen_dtype, local_files_only=True)
    factory = DiffusionProducerFactory(spec, FileSplit(paths, labels),
                                       [f"class_{c}" for c in range(args.num_classes)], "bird")
    return create_ring_and_pool(factory, [args.gen_device], slots=args.ring_slots, image_size=args.img_size,
                            max_reuse=args.max_reuse)


def training_step(model, optimizer, loss_fn):
    def step(x, y):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class LoopedStep:
    """A training step with ``DiffMix`` and the closed loop's trainer side (``ClosedLoop.step`` after the
    forward, a publication every ``FEEDBACK_EVERY`` steps); ``loop_seconds`` sums the loop's own time."""

    def __init__(self, model, optimizer, loss_fn, mix: DiffMix, loop: ClosedLoop):
        self.model, self.optimizer, self.loss_fn, self.mix, self.loop = model, optimizer, loss_fn, mix, loop
        self.steps, self.loop_seconds = 0, 0.0

    def __call__(self, x, labels):
        x, y = self.mix(x, labels)
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        start = time.perf_counter()
        self.loop.step(self.steps, logits, labels, self.mix.synthetic)
        self.loop_seconds += time.perf_counter() - start
        self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


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
    classes = args.num_classes
    with tempfile.TemporaryDirectory(prefix="onlinemix-references-") as work_dir:
        ring, pool = start_generator(args, work_dir)  # sets this process's torch threads first
        try:
            return timed_blocks(args, device, ring, pool, classes)
        finally:
            pool.stop()
            ring.close()


def timed_blocks(args, device: torch.device, ring: SampleRing, pool: GeneratorPool, classes: int) -> dict:
    model = timm.create_model(args.model, num_classes=classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = training_step(model, optimizer, SoftTargetCrossEntropy())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device),
                torch.randint(0, classes, (args.batch_size,), generator=g).to(device)) for _ in range(4)]
    diffmix = DiffMix(p=args.p, gamma=args.gamma, source=ring, label_smoothing=SMOOTHING, num_classes=classes)
    transforms = {
        "none": lambda x, y: (x, smooth_labels(one_hot(y, classes), SMOOTHING)),
        "timm_mixup": Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=SMOOTHING, num_classes=classes),
        "diffmix": diffmix,
        "diffmix_loop": lambda x, y: (x, y),  # the looped step mixes itself: it needs the hard labels
    }
    feedback = FeedbackBlock.create(classes)
    looped = LoopedStep(model, optimizer, SoftTargetCrossEntropy(),
                        DiffMix(p=args.p, gamma=args.gamma, source=ring, label_smoothing=SMOOTHING,
                                num_classes=classes),
                        ClosedLoop(classes, feedback, every=FEEDBACK_EVERY, total_steps=10**9,
                                   gather=lambda value: [value]))
    steps = {mode: looped if mode == "diffmix_loop" else step for mode in MODES}
    pool.start().warm_up(args.warm_samples, timeout=args.warm_timeout)
    for mode in MODES:  # kernels, allocator and autotuning settle before any timing
        time_block(steps[mode], transforms[mode], batches, args.warmup_steps, device)
    looped.steps, looped.loop_seconds = 0, 0.0
    seconds = {mode: [] for mode in MODES}
    before = diffmix.stats()
    ring_before, pool_before, clock = ring.stats(), pool.stats()["written"], time.monotonic()
    for r in range(args.rounds):
        for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
            seconds[mode].append(time_block(steps[mode], transforms[mode], batches, args.block, device))
        print(f"round {r + 1}/{args.rounds}:",
              ", ".join(f"{m} {args.block / seconds[m][-1]:.2f} steps/s" for m in MODES), flush=True)
    after, ring_after, pool_after = diffmix.stats(), ring.stats(), pool.stats()
    elapsed = time.monotonic() - clock
    feedback.close()
    samples = after["samples"] - before["samples"]
    replaced = after["replaced"] - before["replaced"]
    steps_per_s = {m: [args.block / s for s in seconds[m]] for m in MODES}
    # Each mode's block time over none's in the same round, minus 1: drift cancels within a round.
    paired = {m: [s / n - 1 for s, n in zip(seconds[m], seconds["none"])] for m in MODES[1:]}
    loop_paired = [s / d - 1 for s, d in zip(seconds["diffmix_loop"], seconds["diffmix"])]
    diffmix_rate = statistics.median(steps_per_s["diffmix"]) * args.batch_size
    reads = ring_after["read"] - ring_before["read"]
    written = pool_after["written"] - pool_before
    generator_rate = written / elapsed
    return {
        "threads": {"trainer": torch.get_num_threads(), "generator_worker": pool.cpu_threads},
        "steps_per_s": {m: {"median": statistics.median(v), "blocks": v} for m, v in steps_per_s.items()},
        "overhead_vs_none": {m: statistics.median(v) for m, v in paired.items()},
        "overhead_vs_none_range": {m: [min(v), max(v)] for m, v in paired.items()},
        # The closed loop's trainer side: its own measured time per step over the looped step's time,
        # and the paired block-time ratio against DiffMix alone (noisier: it holds the block noise too).
        "closed_loop": {"feedback_every": FEEDBACK_EVERY, "publications": looped.loop.publication,
                        "ms_per_step": 1000 * looped.loop_seconds / looped.steps,
                        "share_of_step": looped.loop_seconds / sum(seconds["diffmix_loop"]),
                        "overhead_vs_diffmix": statistics.median(loop_paired),
                        "overhead_vs_diffmix_range": [min(loop_paired), max(loop_paired)]},
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
    """A ``Producer`` writing blank samples at ``rate`` images/s, never catching up on waits."""

    dropped = 0

    def __init__(self, rate: float, size: int, batch: int):
        self.interval, self.size, self.batch = batch / rate, size, batch
        self.due = time.monotonic()

    def __call__(self) -> SampleBatch:
        now = time.monotonic()
        self.due = max(self.due + self.interval, now)  # time spent blocked on a full ring is not owed
        time.sleep(self.due - now)
        return SampleBatch(torch.zeros(self.batch, 3, self.size, self.size, dtype=torch.uint8),
                           torch.zeros(self.batch, dtype=torch.long), torch.ones(self.batch, dtype=torch.long),
                           torch.full((self.batch,), 0.5))


class PacedProducerFactory:
    """A ``ProducerFactory`` of ``PacedProducer``."""

    def __init__(self, rate: float, size: int, batch: int = 4):
        self.rate, self.size, self.batch = rate, size, batch

    def __call__(self, device) -> PacedProducer:
        return PacedProducer(self.rate, self.size, self.batch)


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
        with GeneratorPool(ring, PacedProducerFactory(ratio * demand, 8), "cpu", cpu_threads=1) as pool:
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
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    throughput = np.logspace(1, 4, 50)
    for p in (0.1, 0.3, 0.5):
        left.plot(throughput, p * throughput, label=f"p = {p}")
    for value, label, style in ((PAPER_IMAGES_PER_S, "paper: 4179 img/GPU-hour (RTX 3090)", ":"),
                                (result["overhead"]["generator_images_per_s"], "this run's generator", "--")):
        left.axhline(value, color="grey", linestyle=style, label=f"{label}: {value:.2f}/s")
    point = result["overhead"]
    left.plot(point["demand_images_per_s"] / args.p, point["demand_images_per_s"], "ko", label="this run's demand")
    left.set(xscale="log", yscale="log", xlabel="training throughput T (samples/s)",
             ylabel="synthetic images/s (p × T)", title="images/s for every read to be fresh")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)

    ratios = np.exp2(np.linspace(-3, 1, 81))
    labels = {"served": "requests served (realised fraction / p)", "fresh_fraction": "fresh share of reads",
              "reads_per_sample": f"reads per sample / {args.max_reuse}"}
    for key, label in labels.items():
        scale = args.max_reuse if key == "reads_per_sample" else 1.0
        line = right.plot(ratios, [predicted(r, args.max_reuse)[key] / scale for r in ratios], label=label)[0]
        measured = result["supply_versus_demand"]
        right.plot([row["supply_ratio"] for row in measured], [row["measured"][key] / scale for row in measured],
                   "o", markerfacecolor="none", color=line.get_color())
    right.set_xscale("log", base=2)
    right.set(ylim=(0, 1.05), xlabel="supply ratio S / (p T)", ylabel="fraction",
              title="ring reuse: lines model, circles measured")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument("--gen-finetuned", default=None, help="personalised folder: diffmix (default: realmix)")
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
    print(f"closed loop: {o['closed_loop']['ms_per_step']:.3f} ms per step, "
          f"{o['closed_loop']['share_of_step']:.3%} of the looped step")
    print("overhead vs none:", {m: f"{v:+.1%}" for m, v in o["overhead_vs_none"].items()},
          f"synthetic {o['synthetic_fraction']['realised']:.3f} at p {args.p}, generator "
          f"{o['generator_images_per_s']:.2f} img/s against demand {o['demand_images_per_s']:.2f}")


if __name__ == "__main__":
    main()
