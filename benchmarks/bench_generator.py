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

``--options`` compares the generator's speed options instead, side by side in one run:
a ``DiffusionProducer`` (what a pool worker runs) makes Diff-Mix translations of the
demo data set's training images with the personalised demo generator, mixed strengths
{0.5, 0.7, 0.9}, under each option set in turn (rounds, the order rotating); raw
images/s, and *useful* images/s: raw × the share of s = 0.7 translations that the demo
probe (``demo_generator.py``) calls the target species, measured per option set on
the same references and seeds.

    python benchmarks/bench_generator.py --options --finetuned runs/demo-ti-db
    python benchmarks/bench_generator.py --options --accelerator runs/demo-distill \
        --sets continuous+posteriors deep_cache_2+steps_20 distilled_2 distilled_4 distilled_8
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from report import RESULTS, machine, pyplot, sync, write_report
from sd15 import sd15_architecture

from onlinemix.generator.components import load_components
from onlinemix.generator.tiny import tiny_components
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


# -- speed options ------------------------------------------------------------------------------------------

OPTION_SETS = {  # GeneratorSpec fields per set, each adding one lever; "today": before continuous batching and caching
    "today": dict(continuous=False, posterior_cache=0, fuse_lora=False),
    "fused_lora": dict(continuous=False, posterior_cache=0),
    "continuous": dict(posterior_cache=0),
    "continuous+posteriors": dict(),
    "deep_cache_2": dict(deep_cache=2),
    "deep_cache_3": dict(deep_cache=3),
    "deep_cache_2+steps_20": dict(deep_cache=2, steps=20),
    "deep_cache_3+steps_20": dict(deep_cache=3, steps=20),
    "steps_8+ddim_trailing": dict(scheduler="ddim-trailing", steps=8),  # an 8-step adapter's speed (fused: free)
    # `onlinemix distill`'s student (--accelerator): every strength runs all its LCM steps, one U-Net call each.
    "distilled_2": dict(scheduler="lcm-strength", steps=2, guidance=1.0),
    "distilled_4": dict(scheduler="lcm-strength", steps=4, guidance=1.0),
    "distilled_8": dict(scheduler="lcm-strength", steps=8, guidance=1.0),
    "channels_last": dict(channels_last=True),
    "fused_qkv": dict(fuse_qkv=True),
    "compiled": dict(channels_last=True, compile="default"),
    "compiled+cuda_graphs": dict(channels_last=True, compile="reduce-overhead"),
}


class RandomReferences:
    """Random uint8 images standing in for a training set, for models with nothing to recognise (sd15, tiny)."""

    def __init__(self, count: int, size: int, classes: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = [i % classes for i in range(count)]

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]


def option_producers(args, sets: list, device) -> dict:
    """One ``DiffusionProducer`` per option set. demo: Diff-Mix on the demo training images with the
    personalised demo generator; sd15 / tiny: realmix (the same SDEdit compute) on random images."""
    from onlinemix.generator.worker import DiffusionProducerFactory, GeneratorSpec

    if args.model == "demo":
        from onlinemix.data import load_splits

        splits = load_splits(args.data_dir, dataset="demo")
        references, names, strategy, finetuned = splits.train, splits.class_names, "diffmix", args.finetuned

        def fresh():  # personalising changes the components: a fresh copy per set
            return load_components("demo")
    else:
        references, names = RandomReferences(48, 64, 12), [f"class_{i}" for i in range(12)]
        strategy, finetuned = "realmix", None
        built = {"tiny": lambda: tiny_components(0), "sd15": sd15_architecture}[args.model]()

        def fresh():
            return copy.deepcopy(built)
    producers = {}
    for name in sets:
        spec = GeneratorSpec(**{**dict(model=args.model, finetuned=finetuned, strategy=strategy, steps=args.steps,
                                       guidance=args.guidance, resolution=args.resolution, image_size=64,
                                       batch_size=args.batch, dtype=args.dtype, local_files_only=True),
                                **OPTION_SETS[name],
                                **(dict(accelerator=args.accelerator) if "distilled" in name else {})})
        factory = DiffusionProducerFactory(spec, references, names, "bird")
        np.random.seed(0)  # every set plans the same stream of requests
        producers[name] = factory.producer(fresh().to(device=device, dtype=DTYPES[args.dtype]))
    return producers


def stream_rate(producer, images: int, device, calls: list | None = None) -> float:
    """Images/s of ``producer`` over at least ``images`` images (its batch already in flight); the
    rows of every full U-Net call go to ``calls`` (DeepCache's shallow calls bypass the U-Net's forward)."""
    unet = producer.sampler.components.unet
    hook = unet.register_forward_hook(lambda module, args, out: calls.append(len(args[0]))) if calls is not None \
        else None
    sync(device)
    start, made = time.perf_counter(), 0
    while made < images:
        made += len(producer())
    sync(device)
    seconds = time.perf_counter() - start
    if hook is not None:
        hook.remove()
    return made / seconds


def probe_references(args):
    """The demo probe and s = 0.7 translation tasks: rendered references, each toward another species."""
    from demo_generator import renders, train_probe

    probe_x, probe_y, _, _ = renders(args.probe_train, 0)
    probe = train_probe(probe_x, probe_y, epochs=15, seed=0)
    refs, ref_y, _, _ = renders(args.references, 2)
    rng = np.random.default_rng(0)
    targets = torch.tensor([int(rng.choice([c for c in range(int(probe_y.max()) + 1) if c != y]))
                            for y in ref_y.tolist()])
    return probe, refs, targets


def target_share(producer, probe, refs, targets) -> float:
    """The share of s = 0.7 translations of ``refs`` the probe calls their target species."""
    from demo_generator import batches, personalised_prompts, predict

    prompts = personalised_prompts({"class_names": producer.factory.class_names, "tokens": producer.tokens})
    out = torch.cat([producer.sampler.translate(refs[part], [prompts[t] for t in targets[part].tolist()],
                                                [0.7] * len(seeds), seeds) for part, seeds in batches(len(refs))])
    return float((predict(probe, out) == targets).float().mean())


def compare_options(args) -> None:
    if args.model == "demo" and not os.path.isdir(args.finetuned or ""):
        raise SystemExit(f"--options on the demo model needs the personalised demo generator; --finetuned "
                         f"{args.finetuned!r} is no folder: make it with `onlinemix finetune --config "
                         "configs/finetune/demo.yaml --out runs/demo-ti-db` (or `make demo`).")
    device = torch.device(args.device)
    # By default the sets that run on a CPU and whose fidelity the demo probe can judge without an adapter.
    sets = args.sets or [name for name in OPTION_SETS if "compile" not in name and "distilled" not in name
                         and name not in ("channels_last", "steps_8+ddim_trailing")]
    if any("distilled" in name for name in sets) and not args.accelerator:
        raise SystemExit("the distilled_* sets run an `onlinemix distill` output: pass --accelerator FOLDER.")
    producers = option_producers(args, sets, device)
    for producer in producers.values():  # warm-up (and compilation): a batch in flight, posteriors cached
        stream_rate(producer, 2 * args.batch, device)
    rates, calls = {name: [] for name in sets}, {name: [] for name in sets}
    for round_ in range(args.repeats):
        for name in sets[round_ % len(sets):] + sets[:round_ % len(sets)]:
            rates[name].append(stream_rate(producers[name], args.images, device, calls[name]))
            print(f"round {round_}: {name} {rates[name][-1]:.2f} images/s", flush=True)
    runs = []
    for name in sets:
        sampler = producers[name].sampler
        runs.append(dict(options=name, spec=OPTION_SETS[name], images_per_s=statistics.median(rates[name]),
                         rounds=rates[name], full_unet_calls=len(calls[name]),
                         mean_rows_per_full_call=statistics.mean(calls[name]) if calls[name] else None,
                         posterior_hits=sampler.posterior_hits,
                         posterior_misses=sampler.posterior_misses))
    if args.model == "demo":
        probe, refs, targets = probe_references(args)
        for run_ in runs:
            run_["target_share_s07"] = target_share(producers[run_["options"]], probe, refs, targets)
            run_["useful_images_per_s"] = run_["images_per_s"] * run_["target_share_s07"]
    for run_ in runs:
        run_["speedup_vs_first"] = run_["images_per_s"] / runs[0]["images_per_s"]
        useful = f", target share {run_['target_share_s07']:.3f}, useful {run_['useful_images_per_s']:.2f}/s" \
            if "target_share_s07" in run_ else ""
        print(f"{run_['options']}: {run_['images_per_s']:.2f} images/s ({run_['speedup_vs_first']:.2f}x){useful}")
    out = args.out or os.path.join(RESULTS, f"generator_options_{device.type}_{args.model}_{args.dtype}.json")
    write_report("bench_generator --options", out, {k: v for k, v in vars(args).items() if k != "out"}, runs,
                 machine=machine(device), strengths="mixed {0.5, 0.7, 0.9} (the strategy's)",
                 probe_references=len(refs) if args.model == "demo" else None)


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
    parser.add_argument("--model", choices=["tiny", "demo", "sd15"],
                        help="default: tiny; with --options, demo (the only one with a probe)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                        help="one row per strength, then a row of mixed strengths {0.5, 0.7, 0.9}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--out", default=None)
    options = parser.add_argument_group("--options: the generator's speed options on the demo data set")
    options.add_argument("--options", action="store_true", help="compare the speed options (see above)")
    options.add_argument("--sets", nargs="+", choices=sorted(OPTION_SETS), help="option sets (default: all)")
    options.add_argument("--finetuned", default="runs/demo-ti-db", help="the personalised demo generator")
    options.add_argument("--accelerator", help="the distilled_* sets' acceleration LoRA (`onlinemix distill --out`)")
    options.add_argument("--resolution", type=int, default=64, help="generation resolution")
    options.add_argument("--data-dir", default="data/demo", help="the demo data set (written there if missing)")
    options.add_argument("--images", type=int, default=48, help="images per timed stretch")
    options.add_argument("--references", type=int, default=8, help="probe references per species")
    options.add_argument("--probe-train", type=int, default=150, help="probe training renders per species")
    args = parser.parse_args()
    if args.options:
        args.model = args.model or "demo"
        return compare_options(args)
    args.model = args.model or "tiny"
    device = torch.device(args.device)
    builders = {"tiny": lambda: tiny_components(0), "demo": lambda: load_components("demo"), "sd15": sd15_architecture}
    components = builders[args.model]()
    components.to(device=device, dtype=DTYPES[args.dtype])
    if args.compile:
        components.unet = torch.compile(components.unet)
    mixed = [(0.5, 0.7, 0.9)[i % 3] for i in range(args.batch)]
    runs = [run(size, strengths, args, components, device)
            for size in args.sizes for strengths in [[s] * args.batch for s in args.strengths] + [mixed]]
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
