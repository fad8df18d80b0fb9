"""Optimisation steps/s of personalisation (``onlinemix finetune``'s inner step).

One step is what ``onlinemix.finetune`` runs per batch: VAE encode, noise, text
encoder, U-Net forward and backward through LoRA and the token embeddings, gradient
clipping, AdamW, restoring the frozen embedding rows. Images are random (the data
loader is not timed: it runs in its own processes).

    python benchmarks/bench_finetune.py                                    # CPU, tiny model, 64 px
    python benchmarks/bench_finetune.py --device cuda --model sd15 --resolution 512 --precision fp16 bf16

``--model sd15`` is Stable Diffusion 1.5's architecture with random weights (same FLOPs,
CLIP's 49 408-row embedding table). Writes ``benchmarks/results/finetune_<device>_<model>.json``.
"""
from __future__ import annotations

import argparse
import os

import torch
from report import RESULTS, machine, timed_steps, write_report
from sd15 import sd15_architecture

from onlinemix.personalise import Personaliser, cast_frozen
from onlinemix.generator.tiny import tiny_components

AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def measure(args, precision: str, device: torch.device) -> dict:
    components = (sd15_architecture if args.model == "sd15" else tiny_components)(seed=0).to(device=device)
    dtype = AUTOCAST[precision]
    if dtype is not None:
        cast_frozen(components.vae, dtype)  # as onlinemix finetune does
    names = [f"class {c}" for c in range(args.classes)]
    personaliser = Personaliser(components, names, "bird", method=args.method, rank=args.rank)
    parameters = personaliser.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=5e-5, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    components.unet.train()

    def step(k: int) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = personaliser.loss(images, labels, torch.Generator().manual_seed(k))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        scaler.step(optimizer)
        scaler.update()
        personaliser.restore_frozen_rows()
        return loss.item()

    return timed_steps(step, warmup=args.warmup, steps=args.steps, batch=args.batch, device=device,
                       precision=precision, parameters=parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--method", choices=["ti_db", "ti", "db"], default="ti_db")
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", nargs="+", choices=list(AUTOCAST), default=["fp32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/finetune_<device>_<model>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    runs = [measure(args, precision, device) for precision in args.precision]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    out = args.out or os.path.join(RESULTS, f"finetune_{device.type}_{args.model}.json")
    write_report("finetune", out, settings, runs, machine=machine(device), device=str(device))


if __name__ == "__main__":
    main()
