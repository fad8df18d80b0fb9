"""``onlinemix invert``: Diffusion Inversion's first stage (Zhou et al. 2023, "Training on Thin Air").

Every training image gets a conditioning tensor ``c`` of ``L`` vectors in the U-Net's
cross-attention space, learned directly (the text encoder plays no part) with the latent
diffusion noise-prediction loss while the U-Net and VAE stay frozen, at the resolution the
generator will sample at. The store (``conditions.safetensors`` + ``inversion.json``) holds
every ``c`` with its image index and label, and their mean, guidance's unconditional input.

Each step takes the next slice of a per-epoch permutation seeded by ``(seed, epoch)`` and
draws its noise from ``(seed, rank, step)``, so a resumed run continues exactly.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

from .data import check_data_options, load_splits
from .finetune import (CHECKPOINTS, append_loss, checked_loss, command_accelerator, latest_checkpoint,
                       publish_checkpoint)
from .generator.components import load_components
from .generator.conditions import STORE, STORE_JSON
from .options import add_data_arguments, data_options, parse_with_config

logger = logging.getLogger("onlinemix")

class Inversion(torch.nn.Module):
    """One learned condition ``[L, D]`` per training image, and its loss on frozen components.

    Args:
        components: The base generator; its U-Net and VAE are frozen here.
        count: How many images.
        start: ``[L, D]``, where every condition starts.
    """

    def __init__(self, components, count: int, start: torch.Tensor):
        super().__init__()
        self.components = components
        for module in (components.unet, components.vae, components.text_encoder):
            module.requires_grad_(False)
        self.conditions = torch.nn.Parameter(start.detach().float().expand(count, -1, -1).clone())

    def loss(self, moments: torch.Tensor, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The noise-prediction loss of images ``indices`` (posterior ``moments`` ``[B, 2C, h, w]``)."""
        c = self.components
        mean, logvar = moments.float().chunk(2, dim=1)
        shape = mean.shape
        eps = torch.randn(shape, generator=generator).to(mean.device)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * c.vae.config.scaling_factor
        noise = torch.randn(shape, generator=generator).to(mean.device)
        steps = c.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(indices),), generator=generator).to(mean.device)
        noisy = c.scheduler.add_noise(latents, noise, timesteps)
        states = self.conditions[indices.to(self.conditions.device)]
        predicted = c.unet(noisy.to(c.unet.dtype), timesteps, encoder_hidden_states=states.to(c.unet.dtype)).sample
        return F.mse_loss(predicted.float(), noise)


def step_indices(count: int, step: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The images of ``step`` for process ``rank``: consecutive slices of per-epoch permutations, so
    every image is visited once per epoch across all processes."""
    total = batch_size * world
    first = step * total + rank * batch_size
    positions = np.arange(first, first + batch_size)
    epochs = positions // count
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(count)
        mask = epochs == epoch
        out[mask] = order[positions[mask] % count]
    return out


@torch.no_grad()
def encode_training_images(components, split, resolution: int, *, batch_size: int = 32) -> torch.Tensor:
    """Posterior moments ``[N, 2C, h, w]`` of every image of ``split`` stretched to ``resolution`` (as the
    sampler stretches references), computed once."""
    from tqdm import tqdm

    out = []
    for start in tqdm(range(0, len(split), batch_size), desc="encoding training images", leave=False):
        images = torch.stack([
            F.interpolate(split.load(i)[None].float(), size=(resolution,) * 2, mode="bilinear", antialias=True)[0]
            for i in range(start, min(start + batch_size, len(split)))
        ]).div_(127.5).sub_(1).clamp_(-1, 1)
        vae = components.vae
        out.append(vae.encode(images.to(vae.device, vae.dtype)).latent_dist.parameters.float())
    return torch.cat(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onlinemix invert", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file of defaults; flags given here override it")
    p.add_argument("--model", help="base model: a diffusers folder or hub id (Stable Diffusion 1.5), or 'demo'")
    add_data_arguments(p.add_argument_group("data"))
    p.add_argument("--vectors", type=int, default=4, help="vectors L per learned condition")
    p.add_argument("--resolution", type=int, default=512, help="the resolution the generator will sample at")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32, help="images per step and process")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate of the conditions")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--local-files-only", action="store_true", help="never reach a model hub")
    p.add_argument("--out", help="output folder: the condition store")
    return p


def check_args(args) -> None:
    """Stop before any work on settings that cannot run."""
    if not args.model or not args.out:
        raise ValueError("--model (the base: a diffusers folder, hub id or 'demo') and --out (the store's folder) "
                         "are required.")
    check_data_options(args.data_dir, **data_options(args))
    if args.resolution <= 0 or args.resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE's factor), got {args.resolution}.")
    if not 1 <= args.vectors <= 77:
        raise ValueError(f"--vectors must lie in [1, 77] (the text encoder's length), got {args.vectors}.")
    if args.steps < 1 or args.batch_size < 1 or args.checkpoint_every < 1:
        raise ValueError("--steps, --batch-size and --checkpoint-every must be >= 1.")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}.")
    if args.resume:
        if latest_checkpoint(args.out) is None:
            raise FileNotFoundError(f"--resume: {args.out!r} holds no checkpoint to continue from.")
    elif os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out!r} is not empty; pass --overwrite to write into it, --resume to "
                         "continue its run, or choose another folder.")


def save_checkpoint(out: str, step: int, inversion: Inversion, optimizer) -> None:
    """A complete folder per checkpoint, then an atomic pointer to it: a crash never leaves a half one."""
    from safetensors.torch import save_file

    root = os.path.join(out, CHECKPOINTS)
    name = f"step-{step:08d}"
    os.makedirs(os.path.join(root, name), exist_ok=True)
    save_file({"conditions": inversion.conditions.detach().cpu().contiguous()}, os.path.join(root, name, STORE))
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, os.path.join(root, name, "optimizer.pt"))
    publish_checkpoint(root, name)


def load_checkpoint(folder: str, inversion: Inversion, optimizer) -> int:
    from safetensors.torch import load_file

    with torch.no_grad():
        inversion.conditions.copy_(load_file(os.path.join(folder, STORE))["conditions"])
    state = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def main(argv=None) -> dict:
    """``onlinemix invert``: returns the store's facts and the loss per step."""
    args = parse_with_config(build_parser(), argv)
    check_args(args)
    return invert(args)


def invert(args) -> dict:
    from tqdm import tqdm

    accelerator = command_accelerator(args.mixed_precision)
    main_process = accelerator.is_main_process
    with accelerator.main_process_first():  # the demo world is written once
        splits = load_splits(args.data_dir, **data_options(args))
    train = splits.train
    components = load_components(args.model, device=accelerator.device, local_files_only=args.local_files_only)
    moments = encode_training_images(components, train, args.resolution)
    prompt = f"a photo of a {args.metaclass}"
    ids = components.tokenizer([prompt], padding="max_length", max_length=components.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():  # every condition starts from the generic prompt's first L states
        start = components.text_encoder(ids.to(accelerator.device))[0][0, :args.vectors]
    inversion = Inversion(components, len(train), start)
    optimizer = torch.optim.AdamW([inversion.conditions], lr=args.lr, weight_decay=0.0)
    inversion, optimizer = accelerator.prepare(inversion, optimizer)
    model = accelerator.unwrap_model(inversion)

    first = 0
    if args.resume:
        first = load_checkpoint(latest_checkpoint(args.out), model, optimizer)
        logger.info("resuming %s at step %d", args.out, first)
    elif main_process and args.overwrite:
        shutil.rmtree(os.path.join(args.out, CHECKPOINTS), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    losses = {}
    bar = tqdm(total=args.steps, initial=first, desc="inverting", disable=not main_process)
    for step in range(first, args.steps):
        indices = torch.from_numpy(step_indices(len(train), step, args.batch_size, seed=args.seed,
                                                rank=accelerator.process_index, world=accelerator.num_processes))
        stream = np.random.default_rng([args.seed, accelerator.process_index, step, 1])
        generator = torch.Generator().manual_seed(int(stream.integers(2**62)))
        with accelerator.autocast():
            loss = model.loss(moments[indices.to(moments.device)], indices, generator)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        value = losses[step + 1] = checked_loss(accelerator, loss, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if main_process:
            append_loss(os.path.join(args.out, "loss.csv"), step + 1, value)
            if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
                save_checkpoint(args.out, step + 1, model, optimizer)
    bar.close()
    accelerator.wait_for_everyone()
    info = save_store(args, model.conditions.detach().cpu(), train, splits.class_names) if main_process else {}
    return {"info": info, "losses": losses}


def save_store(args, conditions: torch.Tensor, train, class_names) -> dict:
    """``conditions.safetensors`` (conditions, mean, image indices, labels) and ``inversion.json``."""
    from safetensors.torch import save_file

    save_file({"conditions": conditions.contiguous(), "mean": conditions.mean(0).contiguous(),
               "ids": torch.arange(len(train), dtype=torch.int64),
               "labels": torch.tensor(list(train.labels), dtype=torch.int64)}, os.path.join(args.out, STORE))
    info = {"base_model": args.model, "resolution": args.resolution, "vectors": args.vectors,
            "width": int(conditions.shape[-1]), "count": len(train), "class_names": list(class_names),
            "metaclass": args.metaclass, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "training_images": train.fingerprint(),
            "data": {"data_dir": args.data_dir, "dataset": args.dataset, "shots": args.shots,
                     "imbalance_factor": args.imbalance_factor, "val_fraction": args.val_fraction,
                     "data_seed": args.data_seed}}
    with open(os.path.join(args.out, STORE_JSON), "w") as f:
        json.dump(info, f, indent=2)
    return info
