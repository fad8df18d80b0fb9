"""Personalisation, Diff-Mix's first stage: textual inversion + LoRA ("TI+DB"), TI-only, DB-only.

``Personaliser`` turns loaded ``Components`` into a trainable personalisation: one new
token ``<class_i>`` per class (``ti_db``, ``ti``) of K learned vectors (K tokenizer words,
``token_words``), initialised from an existing word (the paper's rare "ktn") or from a
description of each class, and LoRA on the U-Net's attention projections (``ti_db``, ``db``).
Tokens and LoRA learn at learning rates of their own. Its
``loss`` is Stable Diffusion's noise-prediction MSE on captions "a photo of a <class_i>
{metaclass}" (``db``: the class name instead of a token), the very prompts the generator
later uses. ``main`` is ``onlinemix finetune``: data, accelerate, AdamW, checkpoints,
exact resume, the output folder the generator loads, and a preview grid.

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
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cli import parse_with_config
from .data import add_data_arguments, check_data_arguments, load_splits
from .generator.components import LORA_TARGETS, Components, add_tokens, load_components, token_words
from .plan import get_strategy, placeholder_token

logger = logging.getLogger("onlinemix")

METHODS = ("ti_db", "ti", "db")
# The authors initialised every token from CLIP's rare sub-word "ktn" (id 42170).
INITIALIZER = "ktn"
CHECKPOINTS = "checkpoints"


def class_tokens(class_names: Sequence[str], method: str) -> list:
    """What stands for each class in captions: ``<class_i>``, or the class name for ``db``."""
    if method == "db":
        return list(class_names)
    return [placeholder_token(i) for i in range(len(class_names))]


class Personaliser:
    """The trainable part of a personalised generator and its training loss.

    Args:
        components: A loaded base model (``load_components``); it is modified in place
            (tokens added to tokenizer and text encoder, a LoRA adapter on the U-Net).
        class_names: Class names in label order.
        metaclass: What the classes are ("bird" ...), the caption's last word.
        method: ``ti_db`` (tokens + LoRA, the paper's), ``ti`` (tokens only) or ``db``
            (LoRA only, class names in captions).
        rank: LoRA rank (10 in the paper); alpha equals the rank.
        vectors_per_token: K, the learned vectors of each class token (1 in the paper).
        initializer: Existing word whose embedding (mean over its sub-words) starts every vector of
            every class without a description.
        descriptions: ``{class name: words}``: a class's K vectors start from its description's
            sub-word embeddings, split into K consecutive runs, each run's mean one vector.
    """

    def __init__(self, components: Components, class_names: Sequence[str], metaclass: str, *,
                 method: str = "ti_db", rank: int = 10, vectors_per_token: int = 1,
                 initializer: str = INITIALIZER, descriptions: Optional[dict] = None):
        descriptions = descriptions or {}
        self.check_inputs(components, class_names, method, rank, vectors_per_token, descriptions)
        self.components, self.method, self.rank = components, method, rank
        self.class_names, self.metaclass = list(class_names), metaclass
        self.vectors_per_token = vectors_per_token
        self.tokens = class_tokens(class_names, method)
        # What stands for each class in a caption: its token's K words, or its name (db).
        self.prompt_tokens = list(self.tokens)
        # What `loss` runs; a training loop may swap in wrapped (e.g. DDP) versions.
        self.unet, self.text_encoder = components.unet, components.text_encoder
        for module in (self.unet, self.text_encoder, components.vae):
            module.requires_grad_(False)
        self.token_ids = []
        if method != "db":
            starts = {token: self.initial_vectors(descriptions.get(name, initializer), vectors_per_token)
                      for token, name in zip(self.tokens, self.class_names)}
            self.prompt_tokens = list(add_tokens(components, starts).values())
            table = components.text_encoder.get_input_embeddings().weight
            self.token_ids = components.tokenizer.convert_tokens_to_ids(
                [w for t in self.tokens for w in token_words(t, vectors_per_token)])
            table.requires_grad_(True)
            # Every other row is put back after each step: only the new tokens learn.
            self.frozen_rows = table.detach().clone()
            self.keep = torch.ones(len(table), dtype=torch.bool, device=table.device)
            self.keep[self.token_ids] = False
        if method != "ti":
            from peft import LoraConfig

            components.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=LORA_TARGETS))
        prompt = get_strategy("diff-mix")
        captions = [prompt.prompt_for(c, self.class_names, metaclass, self.prompt_tokens)
                    for c in range(len(class_names))]
        self.captions = captions
        self.caption_ids = components.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt",
                                                max_length=components.tokenizer.model_max_length).input_ids
        from diffusers import DDPMScheduler

        # Training noise: the base model's own DDPM schedule.
        self.noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)

    @staticmethod
    def check_inputs(components: Components, class_names: Sequence[str], method: str, rank: int,
                     vectors_per_token: int, descriptions: dict) -> None:
        if method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}.")
        if len(class_names) < 2:
            raise ValueError(f"Personalisation needs at least 2 classes, the data set has {len(class_names)}.")
        if method != "ti" and rank < 1:
            raise ValueError(f"--rank must be >= 1, got {rank}.")
        if vectors_per_token < 1:
            raise ValueError(f"--vectors-per-token must be >= 1, got {vectors_per_token}.")
        if method == "db" and (vectors_per_token != 1 or descriptions):
            raise ValueError("--method db learns no tokens: drop --vectors-per-token and --class-descriptions, "
                             "or use --method ti_db.")
        unknown = sorted(set(descriptions) - set(class_names))
        if unknown:
            raise ValueError(f"--class-descriptions names classes the data set lacks: {unknown[:3]}; its keys must be "
                             f"class names such as {list(class_names)[:2]}.")
        if method != "db":
            vocab = components.tokenizer.get_vocab()
            clash = [placeholder_token(i) for i in range(len(class_names)) if placeholder_token(i) in vocab]
            if clash:
                raise ValueError(f"The tokenizer already holds {clash[:3]}: fine-tune from the base model, not from "
                                 "an already personalised one.")

    def initial_vectors(self, words: str, count: int) -> torch.Tensor:
        """``[count, D]``: the sub-word embeddings of ``words`` split into ``count`` consecutive runs (each
        sub-word reused in turn when there are fewer), each run averaged."""
        ids = self.components.tokenizer(words, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"{words!r} encodes to no token; pass existing words to --initializer or "
                             "--class-descriptions.")
        table = self.components.text_encoder.get_input_embeddings().weight.detach().float()
        if len(ids) < count:
            return table[[ids[k % len(ids)] for k in range(count)]]
        return torch.stack([table[list(run)].mean(0) for run in np.array_split(ids, count)])

    def parameters(self) -> list:
        """The trainable tensors: the LoRA weights (db, ti_db) and the embedding table (ti, ti_db)."""
        return [p for group in self.parameter_groups(1.0, 1.0) for p in group["params"]]

    def parameter_groups(self, lr: float, token_lr: float) -> list:
        """Optimizer groups: LoRA at ``lr``, the embedding table (only the new rows learn) at ``token_lr``."""
        groups = []
        lora = [p for p in self.components.unet.parameters() if p.requires_grad]
        if lora:
            groups.append({"params": lora, "lr": lr})
        if self.token_ids:
            groups.append({"params": [self.components.text_encoder.get_input_embeddings().weight], "lr": token_lr})
        return groups

    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-prediction MSE for ``images`` (float ``[B, 3, R, R]`` in [-1, 1]) of classes ``labels``.

        Noise, timesteps and the VAE's posterior sample come from ``generator`` (on the CPU)."""
        vae, device = self.components.vae, images.device
        with torch.no_grad():
            posterior = vae.encode(images.to(vae.dtype)).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
            latents = (posterior.mean + posterior.std * eps).float() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=generator).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        text = self.text_encoder(self.caption_ids[labels.cpu()].to(device))[0]
        prediction = self.unet(noisy, timesteps, text).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())

    def drop_frozen_gradients(self) -> None:
        """Zero the embedding table's gradient outside the new tokens' rows. The caption's other words
        ("a photo of a", the metaclass, padding) get gradients too; clipping must measure only what learns."""
        if self.token_ids:
            grad = self.components.text_encoder.get_input_embeddings().weight.grad
            if grad is not None:
                grad[self.keep] = 0

    def restore_frozen_rows(self) -> None:
        """Put back every embedding row but the new tokens' (weight decay and Adam touch them all)."""
        if self.token_ids:
            table = self.components.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[self.keep] = self.frozen_rows[self.keep]

    def embeddings(self) -> dict:
        """``{token: learned vectors}`` in class order (empty for ``db``): ``[D]`` for one vector per
        token (the paper's and diffusers' file layout), ``[K, D]`` for K."""
        if not self.token_ids:
            return {}
        table = self.components.text_encoder.get_input_embeddings().weight.detach().float().cpu()
        rows = table[self.token_ids].reshape(len(self.tokens), self.vectors_per_token, -1)
        return {t: (row[0] if self.vectors_per_token == 1 else row).clone() for t, row in zip(self.tokens, rows)}

    def trainable_state(self) -> dict:
        """The learned tensors, for checkpoints: LoRA (peft keys) and the new rows."""
        state = {f"embedding.{t}": row for t, row in self.embeddings().items()}
        if self.method != "ti":
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(self.components.unet)
            state.update({f"lora.{k}": v.detach().cpu() for k, v in lora.items()})
        return state

    def load_trainable_state(self, state: dict) -> None:
        table = self.components.text_encoder.get_input_embeddings().weight
        ids = torch.tensor(self.token_ids).reshape(len(self.tokens), self.vectors_per_token)
        with torch.no_grad():
            for token, rows in zip(self.tokens, ids):
                table[rows] = state[f"embedding.{token}"].reshape(len(rows), -1).to(table.dtype)
        if self.method != "ti":
            from peft.utils import set_peft_model_state_dict

            lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
            set_peft_model_state_dict(self.components.unet, lora)


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast a frozen diffusers model's weights. Through ``torch.nn.Module.to``: diffusers' own
    ``to`` warns about fp32-kept modules on every dtype cast, even when there are none."""
    torch.nn.Module.to(module, dtype=dtype)


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
    p = argparse.ArgumentParser(prog="onlinemix finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file of defaults; flags given here override it")
    p.add_argument("--model", help="base model: a diffusers folder or hub id (Stable Diffusion 1.5)")
    add_data_arguments(p.add_argument_group("data"))
    p.add_argument("--method", choices=METHODS, default="ti_db",
                   help="ti_db: tokens + LoRA (the paper's); ti: tokens only (DA-Fusion); db: LoRA only")
    p.add_argument("--steps", type=int, default=35000)
    p.add_argument("--rank", type=int, default=10, help="LoRA rank")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of LoRA (and of the tokens, "
                   "without --token-lr)")
    p.add_argument("--token-lr", type=float, help="AdamW learning rate of the learned token vectors (default: --lr)")
    p.add_argument("--vectors-per-token", type=int, default=1,
                   help="learned vectors per class token (multi-vector textual inversion; 1 in the paper)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step and process")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--initializer", default=INITIALIZER, help="existing word that starts every new token")
    p.add_argument("--class-descriptions", help="JSON file {class name: words}: each class's vectors start from "
                   "its words instead of --initializer")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes preparing batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--preview-steps", type=int, default=25, help="denoising steps of the preview grid (0: none)")
    p.add_argument("--local-files-only", action="store_true", help="never reach a model hub")
    p.add_argument("--out", help="output folder: the personalised generator")
    return p


def check_args(args) -> None:
    """Stop before any work on settings that cannot run."""
    if not args.model or not args.out:
        raise ValueError("--model (the base: a diffusers folder or hub id) and --out (the output folder) are required.")
    check_data_arguments(args)
    if args.resolution <= 0 or args.resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE's factor), got {args.resolution}.")
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
    busy = os.path.isdir(args.out) and os.listdir(args.out)
    if args.resume:
        if latest_checkpoint(args.out) is None:
            raise FileNotFoundError(f"--resume: {args.out!r} holds no checkpoint to continue from.")
    elif busy and not args.overwrite:
        raise ValueError(f"--out {args.out!r} is not empty; pass --overwrite to write into it, --resume to "
                         "continue its run, or choose another folder.")


def latest_checkpoint(out: str) -> Optional[str]:
    pointer = os.path.join(out, CHECKPOINTS, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(out, CHECKPOINTS, f.read().strip())


def save_checkpoint(out: str, step: int, personaliser: Personaliser, optimizer, scaler) -> None:
    """A complete folder per checkpoint, then an atomic pointer to it: a crash never leaves a half one."""
    from safetensors.torch import save_file

    root = os.path.join(out, CHECKPOINTS)
    name = f"step-{step:08d}"
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in personaliser.trainable_state().items()},
              os.path.join(folder, "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "step": step}, os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    for old in os.listdir(root):
        if old.startswith("step-") and old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def load_checkpoint(folder: str, personaliser: Personaliser, optimizer, scaler) -> int:
    from safetensors.torch import load_file

    personaliser.load_trainable_state(load_file(os.path.join(folder, "trainable.safetensors")))
    state = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def main(argv=None) -> dict:
    """``onlinemix finetune``: returns the output folder's facts and the loss per step."""
    args = parse_with_config(build_parser(), argv)
    check_args(args)
    return finetune(args)


def finetune(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    # Launched as several processes without a GPU, accelerate would run independent copies unless told CPU.
    several_on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=several_on_cpu)
    set_seed(args.seed)  # the LoRA initialisation
    main_process = accelerator.is_main_process
    with accelerator.main_process_first():  # the toy set is written once
        splits = load_splits(args)
    descriptions = read_descriptions(args.class_descriptions)
    components = load_components(args.model, device=accelerator.device, local_files_only=args.local_files_only)
    if args.mixed_precision != "no":  # the VAE is frozen: no fp32 master copy needed
        cast_frozen(components.vae, torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16)
    personaliser = Personaliser(components, splits.class_names, args.metaclass, method=args.method, rank=args.rank,
                                vectors_per_token=args.vectors_per_token, initializer=args.initializer,
                                descriptions=descriptions)
    groups = personaliser.parameter_groups(args.lr, args.token_lr or args.lr)
    optimizer = accelerator.prepare(torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2))
    # Only modules that learn are wrapped (DDP refuses one without trainable parameters).
    if args.method != "ti":
        personaliser.unet = accelerator.prepare(personaliser.unet)
    if args.method != "db":
        personaliser.text_encoder = accelerator.prepare(personaliser.text_encoder)
    scaler = accelerator.scaler

    start = 0
    if args.resume:
        start = load_checkpoint(latest_checkpoint(args.out), personaliser, optimizer, scaler)
        logger.info("resuming %s at step %d", args.out, start)
    elif main_process and args.overwrite:
        shutil.rmtree(os.path.join(args.out, CHECKPOINTS), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    balanced = bool(args.imbalance_factor)  # the paper: class-balanced sampling for long-tail data
    batches = StepBatches(splits.train, resolution=args.resolution, batch_size=args.batch_size, seed=args.seed,
                          rank=accelerator.process_index, balanced=balanced)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, args.steps),
                                         num_workers=args.workers)
    log_path = os.path.join(args.out, "loss.csv")
    losses = {}
    personaliser.unet.train()
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
        value = accelerator.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(value):  # before any checkpoint: the last good one stays the latest
            raise ValueError(f"The loss became {value} at step {step + 1}; lower --lr or use bf16 instead of fp16, "
                             "then --resume from the last checkpoint.")
        losses[step + 1] = value
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if main_process:
            append_loss(log_path, step + 1, value)
            if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
                save_checkpoint(args.out, step + 1, personaliser, optimizer, scaler)
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
        descriptions = json.load(f)
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
    from .generator.components import PERSONALISATION_JSON, save_personalisation

    info = {"base_model": args.model, "method": args.method, "class_names": personaliser.class_names,
            "metaclass": personaliser.metaclass, "steps": args.steps, "rank": args.rank if args.method != "ti" else 0,
            "lr": args.lr, "token_lr": args.token_lr or args.lr, "vectors_per_token": args.vectors_per_token,
            "initializer": "class descriptions" if args.class_descriptions else args.initializer,
            "batch_size": args.batch_size, "resolution": args.resolution, "seed": args.seed,
            "captions": personaliser.captions[:3], "training_images": train.fingerprint(),
            "data": {"data_dir": args.data_dir, "dataset": args.dataset, "shots": args.shots,
                     "imbalance_factor": args.imbalance_factor, "val_fraction": args.val_fraction,
                     "data_seed": args.data_seed}}
    save_personalisation(args.out, personaliser.components.unet, personaliser.embeddings(), info)
    with open(os.path.join(args.out, PERSONALISATION_JSON)) as f:
        return json.load(f)


def save_preview(personaliser: Personaliser, references, path: str, *, steps: int, resolution: int,
                 seed: int) -> None:
    """A grid: one Diff-Gen sample per class (first 16), then Diff-Mix translations of four
    references toward another class at strengths 0.5, 0.7 and 0.9."""
    from PIL import Image, ImageDraw

    from .generator.sampler import Sampler

    components, names = personaliser.components, personaliser.class_names
    components.unet.eval()
    sampler = Sampler(components, steps=steps, guidance=7.5)
    classes = list(range(min(16, len(names))))
    prompt = get_strategy("diff-mix")
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
