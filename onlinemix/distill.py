"""``onlinemix distill``: a few-step acceleration LoRA distilled from the user's own personalised generator.

The teacher is the personalised U-Net (``onlinemix finetune``'s LoRA folded into its weights, its
learned tokens in the text encoder) guided at ``--guidance``; the student is the same U-Net with a
new LoRA, the acceleration adapter, trained by latent consistency distillation toward SDEdit
translation (``onlinemix.consistency``) on the training images: start points noised as SDEdit
noises them (up to the largest strength served), prompts of every class drawn uniformly, as
Diff-Mix draws its targets. The output folder holds ``pytorch_lora_weights.safetensors``, the
format ``--gen-accelerator`` loads, to sample with ``--gen-scheduler lcm-strength --guidance 1``
and 4 steps (one U-Net call per step, every step inside the strength).

Every step draws its images, flips, targets, noise and timesteps from generators seeded with
``(seed, rank, step)``, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

import numpy as np
import torch

from .commands import (STEP_CHECKPOINTS, check_base_model, check_out_folder, check_resume_settings, checked_loss,
                       command_accelerator, latest_step, load_step, save_step)
from .consistency import ConsistencyDistillation
from .data import check_data_options, load_splits
from .finetune import StepBatches, append_loss
from .generator.adapters import DISTILL_JSON, LORA_WEIGHTS, attach_personalisation, personalisation_info
from .generator.components import load_components
from .options import HelpFormatter, add_data_arguments, data_options, data_record, model_record, parse_with_config
from .personalise import cast_frozen
from .plan import get_strategy

logger = logging.getLogger("onlinemix")

SETTINGS_JSON = "settings.json"  # what a --resume must match, written at the start
TRAINABLE = "accelerator.safetensors"  # a step checkpoint's acceleration LoRA (peft keys)
# LCM-LoRA's layers: attention, feed-forward, the resnets' convolutions and time embeddings, resampling.
ACCELERATOR_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                       "time_emb_proj"]
# The options a resumed run must share with the run it continues.
RESUMED_SETTINGS = ("model", "finetuned", "steps", "rank", "lr", "batch_size", "resolution", "guidance",
                    "max_strength", "solver_steps", "huber_c", "seed", "mixed_precision")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onlinemix distill", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML file of defaults; flags given here override it")
    p.add_argument("--model", help="base model: a diffusers folder or hub id (Stable Diffusion 1.5), or 'demo'")
    p.add_argument("--finetuned", help="the teacher: the output folder of `onlinemix finetune` on this data")
    add_data_arguments(p.add_argument_group("data (the images the personalisation was tuned on)"))
    p.add_argument("--steps", type=int, default=4000, help="optimisation steps")
    p.add_argument("--rank", type=int, default=64, help="rank of the acceleration LoRA (LCM-LoRA's: 64)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="images per step and process")
    p.add_argument("--resolution", type=int, default=512, help="pixels the training images are stretched to "
                   "(the generator's --gen-resolution)")
    p.add_argument("--guidance", type=float, default=7.5, help="the teacher's classifier-free guidance, baked in")
    p.add_argument("--max-strength", type=float, default=0.9,
                   help="the largest SDEdit strength the student serves (Diff-Mix's: 0.9)")
    p.add_argument("--solver-steps", type=int, default=50,
                   help="points of the teacher's DDIM grid (LCM's 50; fewer, longer teacher steps propagate faster, "
                        "see docs/usage/distill.md); the generator samples on this grid")
    p.add_argument("--huber-c", type=float, default=0.001, help="the pseudo-Huber loss constant")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast (accelerate)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes preparing batches")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA start, batches, targets and noise")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--local-files-only", action="store_true", help="never reach a model hub")
    p.add_argument("--out", help="output folder: the acceleration LoRA")
    return p


def check_args(args) -> None:
    """Stop before any work on settings that cannot run."""
    check_base_model(args, out="the output folder", families=("sd",))
    if not args.finetuned:
        raise ValueError("--finetuned (the teacher: the output folder of `onlinemix finetune`) is required.")
    info = personalisation_info(args.finetuned)
    if info["method"] not in get_strategy("diffmix").methods:
        raise ValueError(f"{args.finetuned!r} was personalised with method {info['method']!r}; distillation serves "
                         f"Diff-Mix, which needs {' or '.join(get_strategy('diffmix').methods)}.")
    check_data_options(args.data_dir, **data_options(args))
    if args.steps < 1 or args.batch_size < 1 or args.checkpoint_every < 1 or args.rank < 1:
        raise ValueError("--steps, --batch-size, --checkpoint-every and --rank must be >= 1.")
    if args.lr <= 0 or args.huber_c <= 0:
        raise ValueError(f"--lr and --huber-c must be positive, got {args.lr} and {args.huber_c}.")
    if args.guidance < 1:
        raise ValueError(f"--guidance must be >= 1 (1: no classifier-free guidance), got {args.guidance}.")
    if not 0 < args.max_strength <= 1:
        raise ValueError(f"--max-strength is an SDEdit strength in (0, 1], got {args.max_strength}.")
    if args.solver_steps < 1 or 1000 % args.solver_steps:
        raise ValueError(f"--solver-steps must divide the 1000 training timesteps, got {args.solver_steps}.")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}.")
    progress = latest_step(os.path.join(args.out, STEP_CHECKPOINTS)) is not None
    check_out_folder(args.out, resume=args.resume, overwrite=args.overwrite, progress=progress,
                     progress_is="checkpoint")
    if args.resume:
        if not os.path.isfile(os.path.join(args.out, SETTINGS_JSON)):
            raise FileNotFoundError(f"--resume: {args.out!r} holds checkpoints but no {SETTINGS_JSON}, so it was not "
                                    "started by onlinemix distill; distil into another --out.")
        with open(os.path.join(args.out, SETTINGS_JSON)) as f:
            started = json.load(f)
        check_resume_settings(args.out, started, settings(args), otherwise="distil into another --out")


def settings(args) -> dict:
    return {name: (model_record(getattr(args, name)) if name in ("model", "finetuned") else getattr(args, name))
            for name in RESUMED_SETTINGS}


def main(argv=None) -> dict:
    """``onlinemix distill``: returns the output folder's facts and the loss per step."""
    args = parse_with_config(build_parser(), argv)
    check_args(args)
    result = distill(args)
    if result["info"]:
        print(f"wrote the acceleration LoRA to {args.out}; generate with --gen-accelerator {args.out} "
              "--gen-scheduler lcm-strength --guidance 1 --gen-steps 4", flush=True)
    return result


class Student:
    """The distilled U-Net: its noise prediction with the acceleration adapter on (``student``) and off
    (``teacher``: the personalised model alone).

    Args:
        components: The loaded base model, personalised (``attach_personalisation``); its
            personalisation LoRA is folded into the U-Net's weights and the adapter ``accelerator``
            of rank ``rank`` (alpha = rank) added on ``ACCELERATOR_TARGETS``.
    """

    def __init__(self, components, *, rank: int):
        from peft import LoraConfig

        unet = components.unet
        unet.requires_grad_(False)
        if getattr(unet, "peft_config", None):  # the teacher's LoRA becomes part of the weights the student adapts
            unet.fuse_lora()
            unet.unload_lora()
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=ACCELERATOR_TARGETS), adapter_name="accelerator")
        self.components, self.unet = components, unet  # `unet`: what `student` runs; a loop may wrap it (DDP)

    def student(self, sample, timesteps, conditions):
        return self.unet(sample, timesteps, conditions).sample

    def teacher(self, sample, timesteps, conditions):
        unet = self.components.unet
        unet.disable_adapters()
        try:
            return unet(sample, timesteps, conditions).sample
        finally:
            unet.enable_adapters()

    def parameters(self) -> list:
        return [p for p in self.components.unet.parameters() if p.requires_grad]

    def state(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu() for k, v in
                get_peft_model_state_dict(self.components.unet, adapter_name="accelerator").items()}

    def load_state(self, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.components.unet, state, adapter_name="accelerator")

    def save(self, folder: str) -> None:
        """``pytorch_lora_weights.safetensors`` in diffusers' LoRA layout, with the adapter's config."""
        from diffusers import StableDiffusionPipeline

        # peft's keys as they are: diffusers' conversion renames only the attention layers' keys, and a file
        # of mixed layouts loads without them.
        config = self.components.unet.peft_config["accelerator"]
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=self.state(), weight_name=LORA_WEIGHTS,
                                                  unet_lora_adapter_metadata=config.to_dict())


def prompt_states(components, info: dict, class_names) -> tuple[torch.Tensor, torch.Tensor]:
    """The text states of every class's Diff-Mix prompt ``[C, 77, D]`` and of the empty prompt ``[1, 77, D]``."""
    prompt, tokens = get_strategy("diffmix"), info["tokens"] or list(class_names)
    prompts = [prompt.prompt_for(c, class_names, info.get("metaclass", "object"), tokens)
               for c in range(len(class_names))] + [""]
    tokenizer = components.tokenizer
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():  # one prompt at a time: a row's bits do not depend on the batch it is encoded in
        states = torch.cat([components.text_encoder(row[None].to(components.device))[0] for row in ids])
    return states[:-1], states[-1:]


def distill(args) -> dict:
    from accelerate.utils import set_seed
    from tqdm import tqdm

    from .generator.worker import DiffusionProducerFactory, GeneratorSpec

    accelerator = command_accelerator(args.mixed_precision)
    set_seed(args.seed)  # the LoRA initialisation
    main_process = accelerator.is_main_process
    with accelerator.main_process_first():
        splits = load_splits(args.data_dir, **data_options(args))
    # The checks a Diff-Mix generator makes: the personalisation's classes and training images are these.
    DiffusionProducerFactory(GeneratorSpec(model=args.model, finetuned=args.finetuned, resolution=args.resolution,
                                           local_files_only=args.local_files_only),
                             splits.train, splits.class_names, args.metaclass)
    components = load_components(args.model, device=accelerator.device, local_files_only=args.local_files_only)
    info = attach_personalisation(components, args.finetuned)
    conditions, unconditional = prompt_states(components, info, splits.class_names)
    model = Student(components, rank=args.rank)
    components.text_encoder.requires_grad_(False)
    components.vae.requires_grad_(False)
    if args.mixed_precision != "no":
        cast_frozen(components.vae, torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16)
    objective = ConsistencyDistillation(model.student, model.teacher, components.scheduler.config,
                                        guidance=args.guidance, solver_steps=args.solver_steps,
                                        max_strength=args.max_strength, huber_c=args.huber_c)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2))
    model.unet = accelerator.prepare(model.unet)
    scaler = accelerator.scaler
    checkpoints = os.path.join(args.out, STEP_CHECKPOINTS)
    start = 0
    if args.resume:
        tensors, start = load_step(latest_step(checkpoints), TRAINABLE, optimizer, scaler)
        model.load_state(tensors)
        logger.info("resuming %s at step %d", args.out, start)
    elif main_process:
        if args.overwrite:
            shutil.rmtree(checkpoints, ignore_errors=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, SETTINGS_JSON), "w") as f:
            json.dump(settings(args), f, indent=2)
    accelerator.wait_for_everyone()
    batches = StepBatches(splits.train, resolution=args.resolution, batch_size=args.batch_size, seed=args.seed,
                          rank=accelerator.process_index)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, args.steps),
                                         num_workers=args.workers)
    losses, vae = {}, components.vae
    bar = tqdm(total=args.steps, initial=start, desc="distilling", disable=not main_process)
    for step, (images, _) in zip(range(start, args.steps), loader):
        # A stream of its own (tag 1): StepBatches draws the images from (seed, rank, step).
        stream = np.random.default_rng([args.seed, accelerator.process_index, step, 1])
        generator = torch.Generator().manual_seed(int(stream.integers(2**62)))
        targets = torch.from_numpy(stream.integers(len(splits.class_names), size=len(images)))
        with torch.no_grad():
            posterior = vae.encode(images.to(accelerator.device, vae.dtype)).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device,
                                                                            posterior.mean.dtype)
            latents = (posterior.mean + posterior.std * eps).float() * vae.config.scaling_factor
        with accelerator.autocast():
            loss = objective(latents, conditions[targets.to(conditions.device)], unconditional, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = losses[step + 1] = checked_loss(accelerator, loss, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.5f}")
        if main_process:
            append_loss(os.path.join(args.out, "loss.csv"), step + 1, value)
            if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
                save_step(checkpoints, step + 1, model.state(), TRAINABLE, optimizer, scaler)
    bar.close()
    accelerator.wait_for_everyone()
    facts = {}
    if main_process:
        model.save(args.out)
        facts = {"base_model": model_record(args.model), "finetuned": model_record(args.finetuned),
                 "objective": "latent consistency distillation (arXiv:2310.04378) toward SDEdit translation",
                 "scheduler": "lcm-strength", "guidance_baked_in": args.guidance, "sample_with_guidance": 1,
                 "recommended_steps": 4, "max_strength": args.max_strength, "steps": args.steps, "rank": args.rank,
                 "lr": args.lr, "batch_size": args.batch_size, "resolution": args.resolution,
                 "solver_steps": args.solver_steps, "seed": args.seed, "class_names": splits.class_names,
                 "training_images": splits.train.fingerprint(), "data": data_record(args)}
        with open(os.path.join(args.out, DISTILL_JSON), "w") as f:
            json.dump(facts, f, indent=2)
    return {"info": facts, "losses": losses}

