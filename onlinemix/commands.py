"""What the commands that make a generator's inputs share (``onlinemix finetune``, ``invert`` and ``caption``):
their accelerate ``Accelerator``, the checks of the base model, resolution, output folder and a resume's
settings, a loss that stops the run when it is no longer finite, and step checkpoints.

A step checkpoint is a complete folder ``ROOT/step-NNNNNNNN`` (the command's tensors in one safetensors
file, the optimiser and loss scaler in ``optimizer.pt``), then an atomic pointer ``ROOT/latest`` to it, then
the older folders removed: a crash at any moment leaves the previous checkpoint whole and pointed to.
"""
from __future__ import annotations

import math
import os
import shutil
from typing import Optional

import torch

STEP_CHECKPOINTS = "checkpoints"  # the folder of a command's step checkpoints, inside its --out


def command_accelerator(mixed_precision: str):
    """The accelerate ``Accelerator`` of a command; launched as several processes without a GPU,
    accelerate would run independent copies unless told CPU."""
    from accelerate import Accelerator

    several_on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=several_on_cpu)


def checked_loss(accelerator, loss: torch.Tensor, step: int) -> float:
    """The loss averaged over processes; a non-finite one stops the run before any checkpoint."""
    value = accelerator.reduce(loss.detach(), reduction="mean").item()
    if not math.isfinite(value):  # before any checkpoint: the last good one stays the latest
        raise ValueError(f"The loss became {value} at step {step}; lower --lr or use bf16 instead of fp16, "
                         "then --resume from the last checkpoint.")
    return value


def check_base_model(args, *, out: str, families: Optional[tuple] = None) -> None:
    """``--model`` and ``--out`` given (``out`` says what the output is), the model resolvable and of one of
    ``families`` (None: any, ``components.model_source``), the generation ``--resolution`` on the VAE's grid."""
    from .generator.components import model_family, model_source

    if not args.model or not args.out:
        raise ValueError(f"--model (the base: a diffusers folder, hub id or 'demo') and --out ({out}) are required.")
    family = model_family(model_source(args.model, local_files_only=args.local_files_only, families=families))
    if args.resolution <= 0 or args.resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8 (the VAE's factor), got {args.resolution}.")
    if family is not None and family.flow and args.resolution % 16:
        raise ValueError(f"--resolution must be a multiple of 16 for a {family.title} model (the VAE's factor 8 times "
                         f"its transformer's 2x2 patches), got {args.resolution}.")


def check_resume_settings(out: str, started: dict, now: dict, *, otherwise: str) -> None:
    """Stop a ``--resume`` of ``out`` whose settings ``now`` differ from those it ``started`` with
    (keys are option names with underscores); ``otherwise`` says what else the user can do."""
    changed = [f"--{k.replace('_', '-')} {started.get(k)!r} (now {v!r})" for k, v in now.items() if started.get(k) != v]
    if changed:
        raise ValueError(f"--resume: {out!r} was made with other settings: it started with {', '.join(changed)}; "
                         f"resume with its settings, or {otherwise}.")


def check_out_folder(out: str, *, resume: bool, overwrite: bool, progress: bool, progress_is: str) -> None:
    """A ``--resume`` needs ``progress`` in ``out`` (``progress_is`` says what that is); a fresh run
    needs ``out`` empty or ``--overwrite``."""
    if resume:
        if not progress:
            raise FileNotFoundError(f"--resume: {out!r} holds no {progress_is} to continue from.")
    elif os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out {out!r} is not empty; pass --overwrite to write into it, --resume to "
                         "continue its run, or choose another folder.")


def latest_step(root: str) -> Optional[str]:
    """The folder ``root/latest`` points to, or None before the first step checkpoint."""
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(root, f.read().strip())


def save_step(root: str, step: int, tensors: dict, tensors_file: str, optimizer, scaler) -> None:
    """Write the step checkpoint ``root/step-NNNNNNNN`` (``tensors`` to ``tensors_file`` in it), point
    ``root/latest`` at it atomically, then remove the older ones."""
    from safetensors.torch import save_file

    name = f"step-{step:08d}"
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(folder, tensors_file))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "step": step}, os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    for old in os.listdir(root):
        if old.startswith("step-") and old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def load_step(folder: str, tensors_file: str, optimizer, scaler) -> tuple[dict, int]:
    """A step checkpoint's tensors and the step it was written at; the optimiser and scaler restored."""
    from safetensors.torch import load_file

    state = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return load_file(os.path.join(folder, tensors_file)), int(state["step"])
