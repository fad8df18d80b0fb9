"""Optimisation steps/s and memory of distillation (``onlinemix distill``'s inner step).

One step is what ``onlinemix.distill`` runs per batch: VAE encode, the student's U-Net forward and
backward through the acceleration LoRA at the batch's start points, the guided teacher's DDIM step
(one U-Net call on the conditional and unconditional rows together), the student's target without
gradient, gradient clipping, AdamW. Images and text states are random (the data loader is not timed:
it runs in its own processes).

    python benchmarks/bench_distill.py                                     # CPU, tiny model, 64 px
    python benchmarks/bench_distill.py --device cuda --model sd15 --resolution 512 --precision fp16 bf16

``--model sd15`` is Stable Diffusion 1.5's architecture with random weights (same FLOPs). Writes
``benchmarks/results/distill_<device>_<model>.json``.
"""
from __future__ import annotations

import argparse
import os

import torch
from report import RESULTS, machine, timed_steps, write_report
from sd15 import sd15_architecture

from onlinemix.consistency import ConsistencyDistillation
from onlinemix.distill import Student
from onlinemix.generator.tiny import tiny_components
from onlinemix.personalise import cast_frozen

AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def measure(args, precision: str, device: torch.device) -> dict:
    components = (sd15_architecture if args.model == "sd15" else tiny_components)(seed=0).to(device=device)
    dtype = AUTOCAST[precision]
    if dtype is not None:
        cast_frozen(components.vae, dtype)  # as onlinemix distill does
    student = Student(components, rank=args.rank)
    objective = ConsistencyDistillation(student.student, student.teacher, components.scheduler.config)
    parameters = student.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device)
    width = components.unet.config.cross_attention_dim
    conditions = torch.randn(args.batch, 77, width, generator=g).to(device)
    unconditional = torch.randn(1, 77, width, generator=g).to(device)
    vae = components.vae

    def step(k: int) -> float:
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad():
            latents = vae.encode(images.to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective(latents, conditions, unconditional, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    return timed_steps(step, warmup=args.warmup, steps=args.steps, batch=args.batch, device=device,
                       precision=precision, parameters=parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--rank", type=int, default=64, help="the acceleration LoRA's rank (the command's default)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", nargs="+", choices=list(AUTOCAST), default=["fp32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/distill_<device>_<model>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    runs = [measure(args, precision, device) for precision in args.precision]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    out = args.out or os.path.join(RESULTS, f"distill_{device.type}_{args.model}.json")
    write_report("distill", out, settings, runs, machine=machine(device), device=str(device))


if __name__ == "__main__":
    main()
