"""Images/s of onlinemix's sampler against diffusers' img2img pipeline, same model and run.

Three ways to make ``--batch`` translations at each strength, timed in turn:

- ``diffusers_batch1``: ``StableDiffusionImg2ImgPipeline`` called once per image, the
  way the original Diff-Mix sampler runs it;
- ``diffusers_batched``: the pipeline called once on the whole batch;
- ``onlinemix``: ``Sampler.translate`` on the whole batch (cached prompt embeddings);
  the ``mixed`` row draws each sample's strength from {0.5, 0.7, 0.9}, which the
  pipeline cannot batch at all.

    python benchmarks/bench_generator.py                           # CPU, tiny model, 64 and 128 px
    python benchmarks/bench_generator.py --device cuda --model sd15 --sizes 512 256 --dtype float16 [--compile]

``--model sd15`` is Stable Diffusion 1.5's architecture with random weights (same
FLOPs); ``--model demo`` the demo generator shipped with the package. Writes
``benchmarks/results/generator_<device>_<model>_<dtype>.json`` and a plot of images/s
against strength (like the paper's Fig. 11) next to it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from diffusers import StableDiffusionImg2ImgPipeline
from report import RESULTS, machine, pyplot, sync, write_report
from sd15 import sd15_architecture

from onlinemix.generator.components import load_components, tiny_components
from onlinemix.generator.sampler import Sampler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PAPER_IMAGES_PER_GPU_HOUR = 4179  # Table 11, RTX 3090, 512 px, 25 steps


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run(size: int, strengths: list, args, components, device) -> dict:
    pipe = components.pipeline(StableDiffusionImg2ImgPipeline)
    pipe.set_progress_bar_config(disable=True)
    sampler = Sampler(components, steps=args.steps, guidance=args.guidance)
    g = torch.Generator().manual_seed(size)
    images = torch.rand(args.batch, 3, size, size, generator=g)
    prompts = [f"a photo of a <class_{i}> bird" for i in range(args.batch)]
    seeds = list(range(args.batch))
    single = len(set(strengths)) == 1

    def gens():
        return [torch.Generator().manual_seed(s) for s in seeds]

    methods = {"onlinemix": lambda: sampler.translate(images, prompts, strengths, seeds)}
    if single:
        kw = dict(strength=strengths[0], num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt")
        methods["diffusers_batched"] = lambda: pipe(prompt=prompts, image=images, generator=gens(), **kw)
        methods["diffusers_batch1"] = lambda: [
            pipe(prompt=prompts[i], image=images[i:i + 1], generator=gens()[i], **kw) for i in range(args.batch)]
    else:
        methods["diffusers_batch1"] = lambda: [
            pipe(prompt=prompts[i], image=images[i:i + 1], generator=gens()[i], strength=strengths[i],
                 num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt")
            for i in range(args.batch)]
    for fn in methods.values():  # warm-up (and compilation)
        fn()
    times = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(timed(fn, device))
    result = {"size": size, "strength": strengths[0] if single else "mixed {0.5, 0.7, 0.9}"}
    for name, t in times.items():
        result[name] = {"images_per_s": args.batch / statistics.median(t), "seconds": t}
    result["speedup_vs_batch1"] = result["onlinemix"]["images_per_s"] / result["diffusers_batch1"]["images_per_s"]
    if device.type == "cuda":
        result["onlinemix"]["images_per_hour"] = 3600 * result["onlinemix"]["images_per_s"]
    return result


def plot(runs: list, path: str, title: str) -> None:
    """Images/s against strength per method and size (lines); mixed strengths as a cross at 0.7."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    fixed = [r for r in runs if not isinstance(r["strength"], str)]
    for size in sorted({r["size"] for r in runs}):
        for method in ("onlinemix", "diffusers_batched", "diffusers_batch1"):
            points = sorted((r["strength"], r[method]["images_per_s"]) for r in fixed if r["size"] == size
                            and method in r)
            mixed = [r[method]["images_per_s"] for r in runs if r["size"] == size and isinstance(r["strength"], str)
                     and method in r]
            if not points and not mixed:
                continue
            line = ax.plot(*zip(*points), marker="o", label=f"{method}, {size} px")[0] if points else None
            if mixed:
                ax.plot([0.7] * len(mixed), mixed, "x", markersize=9, color=line.get_color() if line else None)
    ax.set_xlabel("SDEdit strength s (x: a batch of mixed strengths)")
    ax.set_ylabel("images/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"generator throughput ({title})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["tiny", "demo", "sd15"], default="tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    builders = {"tiny": lambda: tiny_components(0), "demo": lambda: load_components("demo"), "sd15": sd15_architecture}
    components = builders[args.model]()
    components.to(device=device, dtype=DTYPES[args.dtype])
    if args.compile:
        components.unet = torch.compile(components.unet)
    mixed = [(0.5, 0.7, 0.9)[i % 3] for i in range(args.batch)]
    runs = [run(size, strengths, args, components, device)
            for size in args.sizes for strengths in ([0.5] * args.batch, [0.7] * args.batch, [0.9] * args.batch, mixed)]
    suffix = "_compiled" if args.compile else ""
    out = args.out or os.path.join(RESULTS, f"generator_{device.type}_{args.model}_{args.dtype}{suffix}.json")
    plot_path = os.path.splitext(out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    plot(runs, plot_path, f"{args.model}, {args.dtype}, {device.type}, batch {args.batch}, {args.steps} steps")
    report = write_report(
        "bench_generator",
        out,
        {k: v for k, v in vars(args).items() if k != "out"},
        runs,
        machine=machine(device),
        paper_images_per_gpu_hour=PAPER_IMAGES_PER_GPU_HOUR,
        plot=os.path.basename(plot_path),
    )
    for r in report["runs"]:
        line = ", ".join(f"{name} {r[name]['images_per_s']:.2f}/s" for name in
                         ("onlinemix", "diffusers_batched", "diffusers_batch1") if name in r)
        print(f"{r['size']} px, strength {r['strength']}: {line}, speed-up vs batch 1 {r['speedup_vs_batch1']:.2f}x")


if __name__ == "__main__":
    main()
