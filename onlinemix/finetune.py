"""``onlinemix finetune``: train a ``Personaliser`` (``onlinemix.personalise``) on a data set.

``main`` is the command: data, accelerate, AdamW, checkpoints, exact resume, the output
folder the generator loads, and a preview grid.

Every step draws its images, flips, noise and timesteps from a generator seeded with
``(seed, rank, step)``, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .commands import (STEP_CHECKPOINTS, check_base_model, check_out_folder, checked_loss, command_accelerator,
                       latest_step, load_step, save_step)
from .data import check_data_options, load_splits
from .generator.adapters import PERSONALISATION_JSON
from .generator.components import load_components
from .options import HelpFormatter, add_data_arguments, data_options, data_record, model_record, parse_with_config
from .personalise import INITIALIZER, Personaliser, cast_frozen
from .plan import PERSONALISATIONS, get_strategy

logger = logging.getLogger("onlinemix")

TRAINABLE = "trainable.safetensors"  # a step checkpoint's learned tokens and LoRA


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is that step's batch: images drawn (class-balanced if ``balanced``), stretched
    to ``resolution`` like the sampler's references, randomly flipped, in [-1, 1]; and labels.

    Seeded by ``(seed, rank, step)``: any step's batch can be rebuilt, so resuming is exact."""

    def __init__(self, split, *, resolution: int, batch_size: int, seed: int, rank: int = 0,
                 balanced: bool = False):
        self.split, self.resolution, self.batch_size = split, resolution, batch_size
        self.seed, self.rank = seed, rank
        labels = np.asarray(split.labels)
        weights = 1.0 / np.bincount(labels)[labels] if balanced else np.ones(len(labels))
        self.weights = weights / weights.sum()

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int):
        rng = np.random.default_rng([self.seed, self.rank, step, 0])  # tag 0: the training loop's noise uses 1
        picked = rng.choice(len(self.weights), self.batch_size, p=self.weights)
        flips = rng.random(self.batch_size) < 0.5
        images = []
        for index, flip in zip(picked, flips):
            image = self.split.load(int(index))[None].float()
            image = F.interpolate(image, size=(self.resolution,) * 2, mode="bilinear", antialias=True)[0]
            images.append(image.flip(-1) if flip else image)
        labels = torch.tensor([self.split.labels[i] for i in picked], dtype=torch.int64)
        return torch.stack(images).div_(127.5).sub_(1).clamp_(-1, 1), labels


# -- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onlinemix finetune", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML file of defaults; flags given here override it")
    p.add_argument("--model", help="base model: a diffusers folder or hub id (Stable Diffusion 1.x/2.x, the paper's "
                   "1.5; SDXL; SD 3.x; FLUX.1), or 'demo'")
    add_data_arguments(p.add_argument_group("data"))
    p.add_argument("--method", choices=PERSONALISATIONS, default="ti_db",
                   help="ti_db: tokens + LoRA (the paper's); ti: tokens only (DA-Fusion); db: LoRA only")
    p.add_argument("--steps", type=int, default=35000, help="optimisation steps")
    p.add_argument("--rank", type=int, default=10, help="LoRA rank")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of LoRA (and of the tokens, "
                   "without --token-lr)")
    p.add_argument("--token-lr", type=float, help="AdamW learning rate of the learned token vectors (default: --lr)")
    p.add_argument("--vectors-per-token", type=int, default=1,
                   help="learned vectors per class token (multi-vector textual inversion; 1 in the paper)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step and process")
    p.add_argument("--resolution", type=int, default=512, help="pixels the training images are stretched to")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast (accelerate)")
    p.add_argument("--initializer", default=INITIALIZER, help="existing word that starts every new token")
    p.add_argument("--class-descriptions", help="JSON file {class name: words}: each class's vectors start from "
                   "its words instead of --initializer")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes preparing batches")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA start, batches and noise")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--preview-steps", type=int, default=25, help="denoising steps of the preview grid (0: none)")
    p.add_argument("--local-files-only", action="store_true", help="never reach a model hub")
    p.add_argument("--out", help="output folder: the personalised generator")
    return p


def check_args(args) -> None:
    """Stop before any work on settings that cannot run."""
    check_base_model(args, out="the output folder")
    check_data_options(args.data_dir, **data_options(args))
    if args.steps < 1 or args.batch_size < 1 or args.checkpoint_every < 1:
        raise ValueError("--steps, --batch-size and --checkpoint-every must be >= 1.")
    if args.lr <= 0 or (args.token_lr is not None and args.token_lr <= 0):
        raise ValueError(f"--lr and --token-lr must be positive, got {args.lr} and {args.token_lr}.")
    if args.vectors_per_token < 1:
        raise ValueError(f"--vectors-per-token must be >= 1, got {args.vectors_per_token}.")
    if args.method == "db" and (args.vectors_per_token != 1 or args.class_descriptions or args.token_lr is not None):
        raise ValueError("--method db learns no tokens: drop --vectors-per-token, --token-lr and "
                         "--class-descriptions, or use --method ti_db.")
    if args.workers < 0 or args.preview_steps < 0:
        raise ValueError("--workers and --preview-steps must be >= 0 (--preview-steps 0: no preview grid).")
    check_out_folder(args.out, resume=args.resume, overwrite=args.overwrite,
                     progress=latest_step_checkpoint(args.out) is not None, progress_is="checkpoint")


def latest_step_checkpoint(out: str) -> Optional[str]:
    """The folder of the newest step checkpoint in ``out``, or None."""
    return latest_step(os.path.join(out, STEP_CHECKPOINTS))


def save_step_checkpoint(out: str, step: int, personaliser: Personaliser, optimizer, scaler) -> None:
    """The personaliser's trainable tensors, optimiser and scaler at ``step`` (``commands.save_step``)."""
    save_step(os.path.join(out, STEP_CHECKPOINTS), step, personaliser.trainable_state(), TRAINABLE, optimizer, scaler)


def load_step_checkpoint(folder: str, personaliser: Personaliser, optimizer, scaler) -> int:
    """Restore a ``save_step_checkpoint``; returns its step."""
    tensors, step = load_step(folder, TRAINABLE, optimizer, scaler)
    personaliser.load_trainable_state(tensors)
    return step


def main(argv=None) -> dict:
    """``onlinemix finetune``: returns the output folder's facts and the loss per step."""
    args = parse_with_config(build_parser(), argv)
    check_args(args)
    result = finetune(args)
    if result["info"]:  # the main process
        print(f"wrote the personalised generator to {args.out} ({PERSONALISATION_JSON}, its weights, loss.csv); "
              f"train on it with --gen-finetuned {args.out}", flush=True)
    return result


def personalise_first(out: str, config: str, *, num_processes: int = 1) -> None:
    """Make ``out`` with ``onlinemix finetune --config config`` unless it already holds a personalised
    generator (``train.py --gen-finetune-config``); an interrupted personalisation resumes from its last
    checkpoint. A multi-process run is told to make it first: its ranks would each personalise."""
    if os.path.isfile(os.path.join(out, PERSONALISATION_JSON)):
        logger.info("using the personalised generator in %s", out)
        return
    if num_processes > 1:
        raise FileNotFoundError(f"{out!r} holds no personalised generator; make it before a multi-process run: "
                                f"onlinemix finetune --config {config} --out {out}")
    argv = ["--config", config, "--out", out] + (["--resume"] if latest_step_checkpoint(out) is not None else [])
    logger.info("personalising the generator first: onlinemix finetune %s", " ".join(argv))
    main(argv)


def finetune(args) -> dict:
    from accelerate.utils import set_seed
    from tqdm import tqdm

    accelerator = command_accelerator(args.mixed_precision)
    set_seed(args.seed)  # the LoRA initialisation
    main_process = accelerator.is_main_process
    with accelerator.main_process_first():  # the toy set is written once
        splits = load_splits(args.data_dir, **data_options(args))
    descriptions = read_descriptions(args.class_descriptions)
    components = load_components(args.model, device=accelerator.device, local_files_only=args.local_files_only)
    if args.mixed_precision != "no":  # the VAE is frozen: no fp32 master copy needed
        cast_frozen(components.vae, torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16)
    personaliser = Personaliser(components, splits.class_names, args.metaclass, method=args.method, rank=args.rank,
                                vectors_per_token=args.vectors_per_token, initializer=args.initializer,
                                descriptions=descriptions)
    groups = personaliser.parameter_groups(args.lr, args.token_lr or args.lr)
    optimizer = accelerator.prepare(torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2))
    personaliser.wrap(accelerator.prepare)
    scaler = accelerator.scaler

    start = 0
    if args.resume:
        start = load_step_checkpoint(latest_step_checkpoint(args.out), personaliser, optimizer, scaler)
        logger.info("resuming %s at step %d", args.out, start)
    elif main_process and args.overwrite:
        shutil.rmtree(os.path.join(args.out, STEP_CHECKPOINTS), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    balanced = bool(args.imbalance_factor)  # the paper: class-balanced sampling for long-tail data
    batches = StepBatches(splits.train, resolution=args.resolution, batch_size=args.batch_size, seed=args.seed,
                          rank=accelerator.process_index, balanced=balanced)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, args.steps),
                                         num_workers=args.workers)
    log_path = os.path.join(args.out, "loss.csv")
    losses = {}
    components.denoiser.train()
    bar = tqdm(total=args.steps, initial=start, desc="fine-tuning", disable=not main_process)
    for step, (images, labels) in zip(range(start, args.steps), loader):
        # A stream of its own (tag 1): StepBatches draws the images from (seed, rank, step).
        stream = np.random.default_rng([args.seed, accelerator.process_index, step, 1])
        generator = torch.Generator().manual_seed(int(stream.integers(2**62)))
        with accelerator.autocast():
            loss = personaliser.loss(images.to(accelerator.device), labels, generator)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        personaliser.drop_frozen_gradients()  # clip LoRA and the new token rows only
        accelerator.clip_grad_norm_(personaliser.parameters(), 1.0)
        optimizer.step()
        personaliser.restore_frozen_rows()
        value = losses[step + 1] = checked_loss(accelerator, loss, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if main_process:
            append_loss(log_path, step + 1, value)
            if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
                save_step_checkpoint(args.out, step + 1, personaliser, optimizer, scaler)
    bar.close()
    accelerator.wait_for_everyone()
    info = {}
    if main_process:
        info = save_personalised(args, personaliser, splits.train)
        if args.preview_steps:
            save_preview(personaliser, splits.train, os.path.join(args.out, "preview.png"), steps=args.preview_steps,
                         resolution=args.resolution, seed=args.seed)
    return {"info": info, "losses": losses}


def read_descriptions(path: Optional[str]) -> dict:
    """``--class-descriptions``: a JSON object of class name to words, or {} without a file."""
    if not path:
        return {}
    if not os.path.isfile(path):  # read after the data is loaded: the demo world writes its own file
        raise FileNotFoundError(f"--class-descriptions: no file at {path!r}.")
    with open(path) as f:
        try:
            descriptions = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"--class-descriptions {path!r} is not valid JSON ({error}).") from None
    if not isinstance(descriptions, dict) or not all(isinstance(v, str) for v in descriptions.values()):
        raise ValueError(f"--class-descriptions {path!r} must hold one JSON object of class name to words, "
                         'e.g. {"Black footed Albatross": "large dark seabird with long narrow wings"}.')
    return descriptions


def append_loss(path: str, step: int, loss: float) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "loss"])
        writer.writerow([step, f"{loss:.6f}"])


def save_personalised(args, personaliser: Personaliser, train) -> dict:
    """The output folder; ``onlinemix.json`` records the training images (``train.fingerprint()``) and the
    data options that chose them, so a classifier run on other images is refused."""
    from .generator.adapters import PERSONALISATION_JSON, save_personalisation

    info = {"base_model": model_record(args.model), "method": args.method, "class_names": personaliser.class_names,
            "metaclass": personaliser.metaclass, "steps": args.steps, "rank": args.rank if args.method != "ti" else 0,
            "lr": args.lr, "token_lr": args.token_lr or args.lr, "vectors_per_token": args.vectors_per_token,
            "initializer": "class descriptions" if args.class_descriptions else args.initializer,
            "batch_size": args.batch_size, "resolution": args.resolution, "seed": args.seed,
            "captions": personaliser.captions[:3], "training_images": train.fingerprint(),
            "data": data_record(args)}
    save_personalisation(args.out, personaliser.components, personaliser.embeddings(), info)
    with open(os.path.join(args.out, PERSONALISATION_JSON)) as f:
        return json.load(f)


def save_preview(personaliser: Personaliser, references, path: str, *, steps: int, resolution: int,
                 seed: int) -> None:
    """A grid: one Diff-Gen sample per class (first 16), then Diff-Mix translations of four
    references toward another class at strengths 0.5, 0.7 and 0.9."""
    from PIL import Image, ImageDraw

    from .generator.sampler import Sampler

    components, names = personaliser.components, personaliser.class_names
    components.denoiser.eval()
    sampler = Sampler(components, steps=steps, guidance=7.5)
    classes = list(range(min(16, len(names))))
    prompt = get_strategy("diffmix")
    with torch.no_grad():
        generated = sampler.generate([prompt.prompt_for(c, names, personaliser.metaclass, personaliser.prompt_tokens)
                                      for c in classes], [seed + c for c in classes],
                                     height=resolution, width=resolution)
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(references), min(4, len(references)), replace=False)
        rows = []
        for index in picked:
            source = references.labels[int(index)]
            target = (source + 1 + int(rng.integers(len(names) - 1))) % len(names)
            image = references.load(int(index))[None].float().div(255)
            image = F.interpolate(image, size=(resolution,) * 2, mode="bilinear", antialias=True).clamp(0, 1)
            text = prompt.prompt_for(target, names, personaliser.metaclass, personaliser.prompt_tokens)
            out = sampler.translate(image.repeat(3, 1, 1, 1).to(components.device), [text] * 3, [0.5, 0.7, 0.9],
                                    [seed] * 3)
            rows.append((image[0], out, names[source], names[target]))
    tile = 96

    def pil(t):
        return Image.fromarray(t.float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()) \
            .resize((tile, tile))

    columns = 8
    gen_rows = math.ceil(len(classes) / columns)
    grid = Image.new("RGB", (columns * tile, (gen_rows + len(rows)) * (tile + 14) + 14), "white")
    draw = ImageDraw.Draw(grid)
    for k, (c, image) in enumerate(zip(classes, generated)):
        x, y = (k % columns) * tile, (k // columns) * (tile + 14)
        grid.paste(pil(image), (x, y))
        draw.text((x + 2, y + tile), str(names[c])[:15], fill="black")
    for r, (reference, out, source, target) in enumerate(rows):
        y = (gen_rows + r) * (tile + 14)
        grid.paste(pil(reference), (0, y))
        draw.text((2, y + tile), str(source)[:15], fill="black")
        for k, strength in enumerate((0.5, 0.7, 0.9)):
            grid.paste(pil(out[k]), ((k + 1) * tile, y))
            draw.text(((k + 1) * tile + 2, y + tile), f"-> {str(target)[:9]} s={strength}", fill="black")
    grid.save(path)
