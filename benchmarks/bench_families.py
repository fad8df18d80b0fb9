"""Cost per image of each model family: translation, text-to-image and personalisation.

For each family's model:

- ``translate``: ``Sampler.translate`` of ``--batch`` references at ``--resolution`` px, strengths 0.5 / 0.7 /
  0.9 / 0.7 mixed in one continuously batched call, ``--steps`` steps, guidance 4 (FLUX.1-dev embeds it,
  schnell ignores it, the others run classifier-free guidance);
- ``generate``: ``Sampler.generate`` (Diff-Gen), the same batch, steps and guidance;
- ``finetune``: one ``Personaliser`` step (ti_db, rank 10, 200 classes: the loss, backward, clipping, AdamW,
  restoring the frozen rows) on ``--batch`` images.

Seconds per image (per image of a step for ``finetune``), median of ``--repeats`` timed calls after one
untimed, in each of ``--rounds`` rounds that measure every family in turn (so a drifting machine touches all
alike); each figure is the median over the rounds, with its lowest and highest round beside it.

By default the models are the tiny random ones of ``onlinemix.generator.tiny`` on the CPU, the components the
equivalence tests run. Their denoisers have a few hundred thousand parameters, so they say what the family's
code path costs around the denoiser (encoders, packing, guidance, schedule), not what the real models cost.
``--native`` builds each family at its real size with random weights (``native_families.py``: the same
FLOPs, nothing to download), for a GPU:

    python benchmarks/bench_families.py      # writes benchmarks/results/families_cpu_tiny.json
    python benchmarks/bench_families.py --native --device cuda --dtype bfloat16 --resolution 512 \
        --families sdxl sd3 flux-dev --parts translate generate
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from native_families import NATIVE, build_native
from report import RESULTS, machine, sync, write_report

from onlinemix.generator.sampler import Sampler
from onlinemix.generator.tiny import tiny_components, tiny_flux_components, tiny_sd3_components, tiny_sdxl_components
from onlinemix.personalise import Personaliser

BUILDERS = {
    "sd": tiny_components,
    "sdxl": tiny_sdxl_components,
    "sd3": tiny_sd3_components,
    "sd3-without-t5": lambda seed: tiny_sd3_components(seed, t5=False),
    "flux-dev": tiny_flux_components,
    "flux-schnell": lambda seed: tiny_flux_components(seed, guidance_embeds=False),
}
STRENGTHS = [0.5, 0.7, 0.9, 0.7]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def median_seconds(call, repeats: int, device: torch.device) -> float:
    call()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(name: str, args):
    if args.native:
        return build_native(name, device=args.device, dtype=DTYPES[args.dtype])
    dtype = None if args.dtype == "float32" else DTYPES[args.dtype]  # built in float32; naming it makes diffusers warn
    return BUILDERS[name](0).to(device=args.device, dtype=dtype)


def measure(name: str, args) -> dict:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g).to(device)
    row = {"family": name}
    if {"translate", "generate"} & set(args.parts):
        components = build(name, args)
        prompts = [f"a photo of a bird number {k}" for k in range(args.batch)]
        strengths = [STRENGTHS[k % len(STRENGTHS)] for k in range(args.batch)]
        seeds = list(range(args.batch))
        sampler = Sampler(components, steps=args.steps, guidance=4.0)
        row["denoiser_parameters"] = sum(p.numel() for p in components.denoiser.parameters())
        with torch.no_grad():
            if "translate" in args.parts:
                seconds = median_seconds(lambda: sampler.translate(images, prompts, strengths, seeds), args.repeats,
                                         device)
                row["translate_s_per_image"] = round(seconds / args.batch, 4)
            if "generate" in args.parts:
                seconds = median_seconds(lambda: sampler.generate(prompts, seeds, height=args.resolution,
                                                                  width=args.resolution), args.repeats, device)
                row["generate_s_per_image"] = round(seconds / args.batch, 4)
        del components, sampler
    if "finetune" in args.parts:
        row["finetune_s_per_image"] = round(finetune_seconds(name, args, images * 2 - 1) / args.batch, 4)
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(row, flush=True)
    return row


def finetune_seconds(name: str, args, images: torch.Tensor) -> float:
    """One personalisation step's median seconds (fp32 weights: the step trains in float32)."""
    trained = BUILDERS[name](0).to(device=args.device)
    personaliser = Personaliser(trained, [f"class {c}" for c in range(200)], "bird", rank=10)
    parameters = personaliser.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=5e-5, weight_decay=1e-2)
    labels = torch.randint(0, 200, (args.batch,), generator=torch.Generator().manual_seed(1))
    trained.denoiser.train()
    steps = iter(range(10**6))

    def step() -> None:
        loss = personaliser.loss(images, labels, torch.Generator().manual_seed(next(steps)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        personaliser.drop_frozen_gradients()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        personaliser.restore_frozen_rows()

    return median_seconds(step, args.repeats, torch.device(args.device))


def summary(rows: list) -> dict:
    """One family's rounds: each timing's median, and ``<timing>_range`` its lowest and highest round."""
    out = dict(rows[0])
    for key in rows[0]:
        if key.endswith("_s_per_image"):
            values = [row[key] for row in rows]
            out[key] = round(statistics.median(values), 4)
            out[key.replace("_s_per_image", "_range")] = [min(values), max(values)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--native", action="store_true", help="real-size architectures with random weights "
                        f"({', '.join(NATIVE)}; no finetune)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--parts", nargs="+", choices=["translate", "generate", "finetune"],
                        default=["translate", "generate", "finetune"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/families_<device>_<tiny|native>.json)")
    args = parser.parse_args()
    if args.native and ("finetune" in args.parts or not set(args.families) <= set(NATIVE)):
        parser.error(f"--native measures translate and generate of {', '.join(NATIVE)}.")
    torch.manual_seed(0)
    device = torch.device(args.device)
    rounds = [[measure(name, args) for name in args.families] for _ in range(args.rounds)]
    runs = [summary([r[k] for r in rounds]) for k in range(len(args.families))]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    out = args.out or os.path.join(RESULTS, f"families_{device.type}_{'native' if args.native else 'tiny'}.json")
    write_report("families", out, {**settings, "strengths": STRENGTHS, "guidance": 4.0}, runs,
                 machine=machine(device), device=str(device), threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
