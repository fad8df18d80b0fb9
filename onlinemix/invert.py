"""``onlinemix invert``: Diffusion Inversion's first stage (Zhou et al. 2023, "Training on Thin Air").

Every training image gets a conditioning tensor ``c`` of ``L`` vectors in the U-Net's
cross-attention space, learned directly (the text encoder plays no part) with the latent
diffusion noise-prediction loss (``TrainingNoise``, the base model's DDPM schedule) while
the U-Net and VAE stay frozen, at the resolution the generator will sample at. The store
(``conditions.safetensors`` + ``inversion.json``) holds every ``c`` with its image index and
label, and their mean, guidance's unconditional input.

The defaults are the official recipe (github.com/yongchao97/diffusion_inversion): the images
are cut into groups of ``--group-size`` (100) that train one after another, each with an
AdamW of its own (lr 3e-2, weight decay 1e-2) on batches of ``--batch-size`` (50) of its
images, until every image has been in ``--updates-per-image`` (3 000) batches: 6 000
optimizer steps per group of 100, the official checkpoint its sampler reads. Conditions of 5
vectors start uniform in ±1/√G, G the group size: the official's linear layer over G one-hot
inputs, initialised as PyTorch initialises a linear layer (±0.1 at G = 100).

Groups are independent: with several processes (``accelerate launch``) process ``r`` takes
groups ``r, r + world, ...``. A group's batches are slices of per-epoch permutations seeded
by ``(seed, group, epoch)`` and its noise is drawn from ``(seed, group, step)``; a finished
group is saved at once and a group in progress every ``--checkpoint-every`` steps, so
``--resume`` continues exactly.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import check_data_options, load_splits
from .commands import (STEP_CHECKPOINTS, check_base_model, check_out_folder, check_resume_settings,
                       command_accelerator, latest_step, load_step, save_step)
from .generator.components import load_components
from .generator.conditions import STORE, STORE_JSON
from .options import HelpFormatter, add_data_arguments, data_options, data_record, model_record, parse_with_config
from .training_noise import TrainingNoise, sample_latents

logger = logging.getLogger("onlinemix")

GROUPS = "groups"
LOSSES = "losses"
SETTINGS_JSON = "settings.json"
INITS = ("random", "prompt")
# What a resumed run must share with the run it continues: every finished group was trained with them.
SETTINGS = ("model", "resolution", "vectors", "init", "group_size", "batch_size", "updates_per_image", "lr",
            "weight_decay", "seed", "metaclass", "data_dir", "dataset", "shots", "imbalance_factor", "val_fraction",
            "data_seed")


# -- the objective ------------------------------------------------------------------------------


def inversion_loss(components, training_noise: TrainingNoise, conditions: torch.Tensor, moments: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """The noise-prediction MSE of images (posteriors ``moments``) under their ``conditions`` ``[B, L, D]``;
    the posterior sample, the noise and the timesteps come from ``generator`` in that order."""
    unet = components.unet
    drawn = training_noise(sample_latents(components, moments, generator), generator)
    predicted = unet(drawn.noisy.to(unet.dtype), drawn.timesteps,
                     encoder_hidden_states=conditions.to(unet.dtype)).sample
    return F.mse_loss(predicted.float(), drawn.target.float())


# -- groups, batches, starting points ------------------------------------------------------------


def image_groups(count: int, group_size: int) -> list:
    """The training images cut into ``ceil(count / group_size)`` consecutive groups of near-equal size."""
    return np.array_split(np.arange(count), math.ceil(count / group_size))


def batches_per_epoch(size: int, batch_size: int) -> int:
    return math.ceil(size / batch_size)


def group_batch(size: int, step: int, batch_size: int, *, seed: int, group: int) -> np.ndarray:
    """Positions within a group of ``size`` images trained at ``step``: epoch ``step // k`` is a
    permutation seeded by ``(seed, group, epoch)`` cut into ``k`` near-equal batches, so every image
    is in exactly one batch per epoch."""
    k = batches_per_epoch(size, batch_size)
    order = np.random.default_rng([seed, group, step // k]).permutation(size)
    return np.array_split(order, k)[step % k]


def starting_conditions(components, count: int, *, init: str, vectors: int, group_size: int, metaclass: str,
                        seed: int, group: int) -> torch.Tensor:
    """``[count, L, D]`` float32 where a group's conditions start: ``random``, uniform in ±1/√group_size
    (the official's linear layer over one-hot inputs); ``prompt``, the first ``L`` text-encoder states of
    "a photo of a {metaclass}" for every image."""
    width = components.unet.config.cross_attention_dim
    if init == "random":
        generator = torch.Generator().manual_seed(int(np.random.default_rng([seed, group, 2]).integers(2**62)))
        return (torch.rand(count, vectors, width, generator=generator) * 2 - 1) / math.sqrt(group_size)
    tokenizer = components.tokenizer
    ids = tokenizer([f"a photo of a {metaclass}"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = components.text_encoder(ids.to(components.device))[0][0, :vectors].float().cpu()
    return states.expand(count, -1, -1).clone()


@torch.no_grad()
def encode_images(components, split, indices, resolution: int, *, batch_size: int = 32) -> torch.Tensor:
    """Posterior moments ``[N, 2C, h, w]`` of ``split``'s images ``indices`` stretched to ``resolution``
    (as the sampler stretches references)."""
    vae, out = components.vae, []
    for start in range(0, len(indices), batch_size):
        images = torch.stack([
            F.interpolate(split.load(int(i))[None].float(), size=(resolution,) * 2, mode="bilinear",
                          antialias=True)[0]
            for i in indices[start:start + batch_size]
        ]).div_(127.5).sub_(1).clamp_(-1, 1)
        out.append(vae.encode(images.to(vae.device, vae.dtype)).latent_dist.parameters.float())
    return torch.cat(out)


# -- the command --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onlinemix invert", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML file of defaults; flags given here override it")
    p.add_argument("--model", help="base model: a diffusers folder or hub id (Stable Diffusion 1.5), or 'demo'")
    add_data_arguments(p.add_argument_group("data"))
    p.add_argument("--vectors", type=int, default=5, help="vectors L per learned condition")
    p.add_argument("--init", choices=INITS, default="random",
                   help="random: uniform in +-1/sqrt(--group-size) (the official code); prompt: the first L "
                        "text-encoder states of 'a photo of a {metaclass}'")
    p.add_argument("--resolution", type=int, default=512, help="the resolution the generator will sample at")
    p.add_argument("--group-size", type=int, default=100, help="images trained together by one optimizer")
    p.add_argument("--batch-size", type=int, default=50, help="images of a group per step")
    p.add_argument("--updates-per-image", type=int, default=3000,
                   help="batches each image is in: a group of G images trains "
                        "UPDATES * ceil(G / BATCH) steps")
    p.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate of the conditions")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay of the conditions")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast of the frozen model")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting conditions, batches and noise")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints of a group")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--local-files-only", action="store_true", help="never reach a model hub")
    p.add_argument("--out", help="output folder: the condition store")
    return p


def check_args(args) -> None:
    """Stop before any work on settings that cannot run."""
    check_base_model(args, out="the store's folder", families=("sd",))
    check_data_options(args.data_dir, **data_options(args))
    if not 1 <= args.vectors <= 77:
        raise ValueError(f"--vectors must lie in [1, 77] (the text encoder's length), got {args.vectors}.")
    if min(args.group_size, args.batch_size, args.updates_per_image, args.checkpoint_every) < 1:
        raise ValueError("--group-size, --batch-size, --updates-per-image and --checkpoint-every must be >= 1.")
    if not args.lr > 0 or not args.weight_decay >= 0:
        raise ValueError(f"--lr must be positive and --weight-decay >= 0, got {args.lr} and {args.weight_decay}.")
    check_out_folder(args.out, resume=args.resume, overwrite=args.overwrite, progress=has_progress(args.out),
                     progress_is="finished group or checkpoint")
    if args.resume:
        check_same_settings(args)


def run_settings(args) -> dict:
    return {name: getattr(args, name) for name in SETTINGS}


def check_same_settings(args) -> None:
    """Stop a ``--resume`` whose settings differ from those the run in ``--out`` started with."""
    path = os.path.join(args.out, SETTINGS_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: {args.out!r} holds no {SETTINGS_JSON}; it was not made by "
                                "`onlinemix invert` of this version, so start a new --out.")
    with open(path) as f:
        started = json.load(f)
    check_resume_settings(args.out, started, run_settings(args), otherwise="start a new --out")


def group_name(group: int) -> str:
    return f"group-{group:05d}"


def has_progress(out: str) -> bool:
    return any(os.path.isdir(os.path.join(out, folder)) and os.listdir(os.path.join(out, folder))
               for folder in (GROUPS, STEP_CHECKPOINTS))


def finished_path(out: str, group: int) -> str:
    return os.path.join(out, GROUPS, f"{group_name(group)}.safetensors")


def group_checkpoint(out: str, group: int) -> Optional[str]:
    """The latest step checkpoint folder of a group in progress, or None."""
    return latest_step(os.path.join(out, STEP_CHECKPOINTS, group_name(group)))


def save_group_checkpoint(out: str, group: int, step: int, conditions, optimizer, scaler) -> None:
    """The group's conditions, optimiser and scaler at ``step`` (``commands.save_step``)."""
    save_step(os.path.join(out, STEP_CHECKPOINTS, group_name(group)), step, {"conditions": conditions}, STORE,
              optimizer, scaler)


def load_group_checkpoint(folder: str, conditions, optimizer, scaler) -> int:
    """Restore a ``save_group_checkpoint`` into ``conditions``; returns its step."""
    tensors, step = load_step(folder, STORE, optimizer, scaler)
    with torch.no_grad():
        conditions.copy_(tensors["conditions"])
    return step


def save_finished_group(out: str, group: int, conditions: torch.Tensor) -> None:
    """The group's final conditions, written whole then renamed; its checkpoints are dropped after."""
    from safetensors.torch import save_file

    path = finished_path(out, group)
    save_file({"conditions": conditions.detach().cpu().contiguous()}, f"{path}.tmp-{os.getpid()}")
    os.replace(f"{path}.tmp-{os.getpid()}", path)
    shutil.rmtree(os.path.join(out, STEP_CHECKPOINTS, group_name(group)), ignore_errors=True)


def group_losses_path(out: str, group: int) -> str:
    return os.path.join(out, LOSSES, f"{group_name(group)}.csv")


def start_group_losses(out: str, group: int, first: int) -> None:
    """The group's loss file with its rows up to step ``first`` (where a resumed group continues)."""
    path, kept = group_losses_path(out, group), []
    if first and os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if int(line.split(",")[0]) <= first]
    with open(path, "w") as f:
        f.writelines(kept)


def append_group_loss(out: str, group: int, step: int, loss: float) -> None:
    with open(group_losses_path(out, group), "a") as f:
        f.write(f"{step},{loss:.6f}\n")


def write_losses(out: str, groups: int) -> None:
    """``loss.csv``: every group's ``group, step, loss`` rows."""
    with open(os.path.join(out, "loss.csv"), "w", newline="") as f:
        f.write("group,step,loss\n")
        for group in range(groups):
            with open(group_losses_path(out, group)) as rows:
                f.writelines(f"{group},{line}" for line in rows)


def main(argv=None) -> dict:
    """``onlinemix invert``: returns the store's facts and the loss of every ``(group, step)``."""
    args = parse_with_config(build_parser(), argv)
    check_args(args)
    result = invert(args)
    if result["info"]:  # the main process
        print(f"wrote {result['info']['count']} conditions to {os.path.join(args.out, STORE)} ({STORE_JSON} beside "
              f"it, loss.csv); train on them with --aug diffinversion --inversion {args.out}", flush=True)
    return result


def invert(args) -> dict:
    accelerator = command_accelerator(args.mixed_precision)
    main_process = accelerator.is_main_process
    with accelerator.main_process_first():  # the demo world is written once
        splits = load_splits(args.data_dir, **data_options(args))
    train = splits.train
    components = load_components(args.model, device=accelerator.device, local_files_only=args.local_files_only)
    for module in (components.unet, components.vae, components.text_encoder):
        module.requires_grad_(False)
    groups = image_groups(len(train), args.group_size)
    if main_process:
        if args.overwrite and not args.resume:
            for folder in (GROUPS, STEP_CHECKPOINTS, LOSSES):
                shutil.rmtree(os.path.join(args.out, folder), ignore_errors=True)
        for folder in (GROUPS, LOSSES):
            os.makedirs(os.path.join(args.out, folder), exist_ok=True)
        with open(os.path.join(args.out, SETTINGS_JSON), "w") as f:
            json.dump(run_settings(args), f, indent=2)
    accelerator.wait_for_everyone()
    mine = [g for g in range(accelerator.process_index, len(groups), accelerator.num_processes)
            if not os.path.isfile(finished_path(args.out, g))]
    losses = {}
    for group in tqdm(mine, desc=f"inverting {len(groups)} groups", disable=not main_process):
        losses.update(invert_group(args, accelerator, components, train, groups[group], group))
    accelerator.wait_for_everyone()
    info = {}
    if main_process:
        from safetensors.torch import load_file

        conditions = torch.cat([load_file(finished_path(args.out, g))["conditions"] for g in range(len(groups))])
        info = save_store(args, conditions, train, splits.class_names, groups)
        write_losses(args.out, len(groups))
    return {"info": info, "losses": losses}


def invert_group(args, accelerator, components, train, members: np.ndarray, group: int) -> dict:
    """Train one group's conditions to the end (resuming its checkpoint with ``--resume``) and save them."""
    steps = args.updates_per_image * batches_per_epoch(len(members), args.batch_size)
    conditions = torch.nn.Parameter(starting_conditions(
        components, len(members), init=args.init, vectors=args.vectors, group_size=args.group_size,
        metaclass=args.metaclass, seed=args.seed, group=group).to(accelerator.device))
    optimizer = torch.optim.AdamW([conditions], lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(accelerator.device.type) if args.mixed_precision == "fp16" else None
    first, checkpoint = 0, group_checkpoint(args.out, group) if args.resume else None
    if checkpoint:
        first = load_group_checkpoint(checkpoint, conditions, optimizer, scaler)
        logger.info("resuming group %d of %s at step %d", group, args.out, first)
    start_group_losses(args.out, group, first)
    moments = encode_images(components, train, members, args.resolution)
    training_noise = TrainingNoise(components.scheduler.config)
    losses = {}
    bar = tqdm(total=steps, initial=first, desc=f"group {group}", leave=False, position=1)
    for step in range(first, steps):
        batch = torch.from_numpy(group_batch(len(members), step, args.batch_size, seed=args.seed, group=group))
        stream = np.random.default_rng([args.seed, group, step, 1])
        generator = torch.Generator().manual_seed(int(stream.integers(2**62)))
        with accelerator.autocast():
            loss = inversion_loss(components, training_noise, conditions[batch.to(conditions.device)],
                                  moments[batch.to(moments.device)], generator)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        value = losses[(group, step + 1)] = float(loss.detach())
        if not math.isfinite(value):  # before any checkpoint: the last good one stays the latest
            raise ValueError(f"The loss became {value} at step {step + 1} of group {group}; lower --lr or use bf16 "
                             "instead of fp16, then --resume from the last checkpoint.")
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        append_group_loss(args.out, group, step + 1, value)
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < steps:
            save_group_checkpoint(args.out, group, step + 1, conditions, optimizer, scaler)
    bar.close()
    save_finished_group(args.out, group, conditions)
    return losses


def save_store(args, conditions: torch.Tensor, train, class_names, groups) -> dict:
    """``conditions.safetensors`` (conditions, mean, image indices, labels) and ``inversion.json``."""
    from safetensors.torch import save_file

    save_file({"conditions": conditions.contiguous(), "mean": conditions.mean(0).contiguous(),
               "ids": torch.arange(len(train), dtype=torch.int64),
               "labels": torch.tensor(list(train.labels), dtype=torch.int64)}, os.path.join(args.out, STORE))
    info = {"base_model": model_record(args.model), "resolution": args.resolution, "vectors": args.vectors, "init": args.init,
            "width": int(conditions.shape[-1]), "count": len(train), "class_names": list(class_names),
            "metaclass": args.metaclass, "group_size": args.group_size, "groups": len(groups),
            "batch_size": args.batch_size, "updates_per_image": args.updates_per_image,
            "steps_per_group": [args.updates_per_image * batches_per_epoch(len(g), args.batch_size) for g in groups],
            "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
            "training_images": train.fingerprint(),
            "data": data_record(args)}
    with open(os.path.join(args.out, STORE_JSON), "w") as f:
        json.dump(info, f, indent=2)
    return info
