#!/usr/bin/env python
"""Train a timm classifier with online Diff-Mix (or a sibling strategy) as augmentation.

    python train.py                                  # no arguments: the demo (configs/demo.yaml)
    python train.py --config configs/toy.yaml
    python train.py --data-dir data/cub --metaclass bird --aug diffmix --gen-device cuda:1 \\
        --gen-model /models/stable-diffusion-v1-5 --gen-finetuned runs/cub-ti-db

A YAML file (``--config``) sets defaults and flags override them; the resolved
arguments are written to the run directory with metrics (JSON lines and CSV),
checkpoints (last and best on validation, written atomically) and sample grids.
This file wires the pieces of ``onlinemix`` together; the algorithms live there
(``ARCHITECTURE.md`` maps them). Several processes (torchrun, ``accelerate launch``)
join through accelerate's ``PartialState``. It stays one module because it is the recipe
a user reads top to bottom: options and their checks, data, augmentation and generator,
model, the loop and what each epoch reports.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch
import yaml

from onlinemix.augmentation import AUGMENTATIONS, augmentation_name, create_generator, mixing_options, strategy_of
from onlinemix.checkpoint import CheckpointWriteError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from onlinemix.data import SplitImages, check_data_options, load_splits
from onlinemix.evaluation import evaluate
from onlinemix.fidelity import FidelityMonitor
from onlinemix.feedback import ClosedLoop, FeedbackBlock
from onlinemix.options import (HelpFormatter, add_data_arguments, add_generator_arguments, check_generator_args,
                               data_options, generator_factory, parse_with_config)
from onlinemix.plan import POLICIES, check_policy, get_strategy
from onlinemix.pool import GeneratorStartError
from onlinemix.run_files import (flat_scalars, log_step, metrics_columns, SampleGrid, save_policy_heatmap, tensorboard,
                                 run_summary, trim_steps, write_metrics)

# RandomResizedCrop's area range for real training images; synthetic images get the same crop.
TRAIN_CROP_SCALE = (0.35, 1.0)
logger = logging.getLogger("onlinemix")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML file of defaults; flags given here override it")
    add_data_arguments(p.add_argument_group("data"))
    model = p.add_argument_group("model and optimisation")
    model.add_argument("--model", default="resnet18",
                       help="any timm model name, with a pretrained tag where it matters (resnet50.tv_in1k)")
    model.add_argument("--pretrained", action="store_true",
                       help="start from timm's pretrained weights of --model (downloaded from the hub once, then "
                            "cached; offline, use --initial-checkpoint)")
    model.add_argument("--initial-checkpoint", help="local weights file (safetensors or .pth) to start from; "
                                                    "tensors whose shape does not fit (a classifier) are skipped")
    model.add_argument("--img-size", type=int, default=224, help="training and evaluation image side, in pixels")
    model.add_argument("--batch-size", type=int, default=64, help="images per step and process")
    model.add_argument("--epochs", type=int, default=128, help="passes over the training images")
    model.add_argument("--opt", choices=["sgd", "adamw"], default="sgd", help="optimiser (timm's create_optimizer_v2)")
    model.add_argument("--lr", type=float, default=0.02, help="peak learning rate of the cosine schedule")
    model.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    model.add_argument("--weight-decay", type=float, default=5e-5, help="weight decay")
    model.add_argument("--warmup-epochs", type=float, default=0.1, help="linear warm-up, as a share of --epochs if < 1")
    model.add_argument("--smoothing", type=float, default=0.1, help="label smoothing, on real and synthetic targets")
    model.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision of the classifier")
    model.add_argument("--channels-last", action="store_true", help="the classifier in channels-last memory format")
    model.add_argument("--compile", action="store_true", help="torch.compile the classifier")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="where the classifier trains")
    model.add_argument("--workers", type=int, default=4, help="DataLoader processes per rank")
    model.add_argument("--seed", type=int, default=0, help="training seed (the data subset follows --data-seed)")
    model.add_argument("--output", default="runs", help="folder that holds the run folders")
    model.add_argument("--name", help="run folder name inside --output (default: derived from the time); a folder "
                                      "that already holds a run gets a number added (NAME-1), unless --resume")
    model.add_argument("--resume", help="checkpoint to continue from")
    model.add_argument("--log-interval", type=int, default=50, help="steps between rows of steps.csv")
    model.add_argument("--eval-every", type=int, default=1,
                       help="evaluate every N epochs and after the last (checkpoints are written every epoch)")
    model.add_argument("--shot-thresholds", type=int, nargs=2, default=[20, 5], metavar=("MANY", "FEW"),
                       help="long-tail accuracy groups: many-shot classes have more than MANY training images, "
                            "few-shot fewer than FEW (CUB-LT 20 5, Flower-LT 30 10)")
    aug = p.add_argument_group("augmentation")
    aug.add_argument("--aug", type=augmentation_name, choices=AUGMENTATIONS, default="diffmix",
                     help="the strategy's name; the paper's spellings (diff-mix, real-guidance ...) work too")
    # --replace-prob: torchrun's own parser mistakes a bare --p for an abbreviation of its --print-completion.
    aug.add_argument("--p", "--replace-prob", dest="p", type=float, default=0.1,
                     help="per-sample synthetic replacement probability (under torchrun, spell it --replace-prob)")
    aug.add_argument("--gamma", type=float, default=0.5,
                     help="label non-linearity: a translation of strength s gives its target s^gamma (0.1-0.3 few-shot)")
    aug.add_argument("--mixup-alpha", type=float, default=1.0, help="Mixup's Beta parameter (--aug mixup)")
    aug.add_argument("--cutmix-alpha", type=float, default=1.0, help="CutMix's Beta parameter (cutmix, *+cutmix)")
    aug.add_argument("--mixup-prob", type=float,
                     help="probability of applying Mixup/CutMix, per batch or per sample by --mixup-mode "
                          "(default: the paper's, 0.3 for mixup and 0.1 for cutmix)")
    aug.add_argument("--mixup-mode", choices=["batch", "pair", "elem"],
                     help="timm's mixing mode (default: the paper's, batch for mixup and elem -- per sample -- "
                          "for cutmix)")
    aug.add_argument("--replay-dir", help="output folder of the offline Diff-Mix sampler (--aug replay)")
    loop = p.add_argument_group("closed loop: the generator follows the classifier")
    loop.add_argument("--gen-policy", choices=POLICIES, default="uniform",
                      help="uniform: the paper's draws; confusion: pairs (target t, source s) in proportion to how "
                           "often real t is called s; hard-class: targets by the classifier's error on them")
    loop.add_argument("--gen-policy-floor", type=float, default=0.2,
                      help="share of requests drawn uniformly whatever the feedback, so no pair starves")
    loop.add_argument("--strength-schedule", type=float, nargs=2, metavar=("START", "END"),
                      help="strength moving linearly from START to END over training instead of the strength set")
    loop.add_argument("--feedback-every", type=int, default=20,
                      help="steps between publications of the classifier's confusion to the generator")
    gen = p.add_argument_group("generator")
    add_generator_arguments(gen)
    gen.add_argument("--gen-device", nargs="+", default=["cuda:1"], help="one or more devices, 'cpu' allowed")
    gen.add_argument("--gen-workers-per-device", type=int, default=1, help="generator processes per --gen-device")
    gen.add_argument("--gen-cluster", metavar="ADDRESS",
                     help="run the generator workers as Ray actors on this cluster instead of --gen-device: 'auto' "
                          "(the cluster `ray start` joined this machine to), ray://HOST:PORT, or 'local' (a Ray "
                          "instance on this machine); needs pip install 'onlinemix[ray]'")
    gen.add_argument("--gen-cluster-workers", type=int, default=1, help="--gen-cluster: generator actors")
    gen.add_argument("--gen-cluster-gpus", type=float, default=1.0,
                     help="--gen-cluster: GPUs per actor (0: CPU actors)")
    gen.add_argument("--gen-finetune-config",
                     help="finetune YAML: if --gen-finetuned holds no personalised generator yet, make it first "
                          "(onlinemix finetune --config FILE --out GEN_FINETUNED); later runs reuse it")
    gen.add_argument("--ring-slots", type=int, default=512, help="synthetic samples the shared-memory ring holds")
    gen.add_argument("--ring-size", type=int, help="image size in the ring (default --img-size)")
    gen.add_argument("--max-reuse", type=int, default=4,
                     help="reads a synthetic sample may serve before it must be replaced")
    gen.add_argument("--gen-hang-timeout", type=float, default=600.0, metavar="SECONDS",
                     help="a generator worker that sends no heartbeat this long counts as hung and is restarted")
    gen.add_argument("--gen-warmup", type=float, default=60.0,
                     help="seconds to wait, at most, for the ring to hold one batch of samples before training")
    return p


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # the quick start: `python train.py` runs the demo
        print(f"No arguments: running the demo ({os.path.relpath(DEMO_CONFIG)}); `python train.py --help` lists "
              "the options.", flush=True)
        argv = ["--config", DEMO_CONFIG]
    args = parse_with_config(build_parser(), argv)
    check_args(args)
    return args


def check_args(args) -> None:
    """Stop before any work on settings that cannot run."""
    check_data_options(args.data_dir, **data_options(args))
    if not 0 <= args.p <= 1:
        raise ValueError(f"--p must lie in [0, 1], got {args.p}.")
    check_optimisation(args)
    if args.mixup_prob is not None and not 0 <= args.mixup_prob <= 1:
        raise ValueError(f"--mixup-prob must lie in [0, 1], got {args.mixup_prob}.")
    if args.pretrained and args.initial_checkpoint:
        raise ValueError("--pretrained (timm's weights) and --initial-checkpoint FILE both choose the starting "
                         "weights; pass one.")
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        raise FileNotFoundError(f"--initial-checkpoint {args.initial_checkpoint!r} is not a file.")
    import timm

    if not timm.is_model(args.model):
        raise ValueError(f"--model {args.model!r} is not a timm model; timm.list_models('resnet*') lists names "
                         "(a pretrained tag after a dot, as resnet50.tv_in1k, is allowed).")
    if args.aug == "replay" and not args.replay_dir:
        raise ValueError("--aug replay needs --replay-dir, the output folder of the offline Diff-Mix sampler.")
    if strategy_of(args.aug) and args.gen_cluster:
        from onlinemix.cluster import check_reachable, import_ray

        import_ray()  # the extra missing: an install hint now
        check_reachable(args.gen_cluster)  # an unreachable cluster: before any work
        if args.gen_cluster_workers < 1 or args.gen_cluster_gpus < 0:
            raise ValueError("--gen-cluster-workers must be >= 1 and --gen-cluster-gpus >= 0.")
    elif strategy_of(args.aug):
        for device in args.gen_device:
            check_device(device, "--gen-device")
        if any(torch.device(d) == torch.device(args.device) for d in args.gen_device) and args.device != "cpu":
            warnings.warn("The generator shares the training device: expect training to slow down.", stacklevel=2)
    check_device(args.device, "--device")
    if args.gen_finetune_config:
        if not args.gen_finetuned:
            raise ValueError("--gen-finetune-config needs --gen-finetuned, the folder to personalise into.")
        if not os.path.isfile(args.gen_finetune_config):
            raise FileNotFoundError(f"--gen-finetune-config {args.gen_finetune_config!r} is not a file.")
    check_run_folder(args)
    if args.epochs < 1 or args.batch_size < 1 or args.eval_every < 1:
        raise ValueError("--epochs, --batch-size and --eval-every must be >= 1.")
    if strategy_of(args.aug):
        check_policy(strategy_of(args.aug), args.gen_policy, args.gen_policy_floor, args.strength_schedule)
        check_generator_args(args)  # now, not after personalising the generator first
    elif args.gen_policy != "uniform" or args.strength_schedule:
        raise ValueError(f"--gen-policy and --strength-schedule steer a generator; --aug {args.aug} runs none.")
    if args.gen_hang_timeout <= 0:
        raise ValueError(f"--gen-hang-timeout must be > 0 seconds, got {args.gen_hang_timeout}.")
    if args.feedback_every < 1:
        raise ValueError(f"--feedback-every must be >= 1, got {args.feedback_every}.")
    many, few = args.shot_thresholds
    if not 0 < few <= many:
        raise ValueError(f"--shot-thresholds MANY FEW needs 0 < FEW <= MANY, got {many} {few}.")


def check_optimisation(args) -> None:
    """Numbers the optimiser, the schedule and the labels need in range (NaN is in no range)."""
    if not 0 < args.lr < math.inf:
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}.")
    for flag, value in (("--weight-decay", args.weight_decay), ("--warmup-epochs", args.warmup_epochs),
                        ("--gamma", args.gamma), ("--mixup-alpha", args.mixup_alpha),
                        ("--cutmix-alpha", args.cutmix_alpha)):
        if not 0 <= value < math.inf:
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}.")
    if args.warmup_epochs >= 1 and args.warmup_epochs > args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs {args.epochs}).")
    for flag, value in (("--momentum", args.momentum), ("--smoothing", args.smoothing)):
        if not 0 <= value < 1:
            raise ValueError(f"{flag} must lie in [0, 1), got {value}.")


def check_run_folder(args) -> None:
    """``--output`` a folder (or none yet) and ``--name`` a plain folder name inside it."""
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f"--output {args.output!r} is a file; pass a folder for the runs.")
    if args.name is not None and (os.path.basename(args.name) != args.name or args.name in ("", ".", "..")):
        raise ValueError(f"--name {args.name!r} is not a plain folder name; the run is written inside --output "
                         f"({args.output}), so pass a name without '/' (or move --output).")


def run_folder(output: str, name: str, *, resume: bool) -> str:
    """``output/name``, or, when that already holds something and this is no ``--resume``, the first free
    ``output/name-N``: a rerun never appends to another run's metrics or overwrites its checkpoints."""
    folder = os.path.join(output, name)
    number = 0
    while not resume and os.path.isdir(folder) and os.listdir(folder):
        number += 1
        folder = os.path.join(output, f"{name}-{number}")
    return folder


def check_device(device: str, flag: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{flag} {device!r} is not a device; use e.g. cpu, cuda, cuda:1.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if (parsed.index or 0) >= count:
            raise ValueError(f"{flag} {device} is not available: this machine has {count} CUDA device(s); "
                             "pass another device, or cpu.")


def gather(state, value) -> list:
    """``value`` of every process, in process order."""
    from accelerate.utils import gather_object

    return gather_object([value]) if state.num_processes > 1 else [value]


def local_world(state) -> int:
    """Processes on this node (torchrun and ``accelerate launch`` say how many)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))


# -- data -------------------------------------------------------------------------------


def normalisation(model) -> tuple:
    """The mean and std the model's pretrained weights expect (timm's pretrained config; ImageNet's by default)."""
    from timm.data import resolve_data_config

    config = resolve_data_config(model=model)
    return tuple(config["mean"]), tuple(config["std"])


def transforms(img_size: int, mean, std):
    """timm's training transform (random resized crop over ``TRAIN_CROP_SCALE``, flip, no colour jitter)
    and its evaluation transform (resize to ``img_size / 0.875``, centre crop)."""
    from timm.data import create_transform

    common = dict(input_size=img_size, interpolation="bilinear", mean=mean, std=std)
    train = create_transform(**common, is_training=True, scale=TRAIN_CROP_SCALE, hflip=0.5, color_jitter=None)
    evaluate = create_transform(**common, crop_pct=0.875)
    return train, evaluate


def loaders(args, splits, state, mean, std):
    train_tf, eval_tf = transforms(args.img_size, mean, std)
    common = dict(num_workers=args.workers, persistent_workers=args.workers > 0)
    train_set = SplitImages(splits.train, train_tf)
    # Seeded and reset per epoch with set_epoch: the same order whether a run was resumed or not.
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=state.num_processes,
                                                  rank=state.process_index, shuffle=True, seed=args.seed)
    per_rank = len(splits.train) // state.num_processes
    train = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                        drop_last=per_rank > args.batch_size, **common)
    evaluate = {name: torch.utils.data.DataLoader(SplitImages(split, eval_tf), batch_size=args.batch_size, **common)
                for name, split in {"val": splits.val, **splits.tests}.items() if len(split)}
    return train, sampler, evaluate


# -- augmentation ------------------------------------------------------------------------


def build_augmentation(args, splits, run_dir, state, mean, std):
    """The batch transform and, for generator strategies, the ring, the generator pool and, for a
    closed loop, the feedback block (on each node's local rank 0)."""
    from onlinemix import DiffMix, RandomResizedCropFlip, ReplaySource, SampleRing

    mix = dict(num_classes=len(splits.class_names), label_smoothing=args.smoothing, mean=mean, std=std,
               synthetic_transform=RandomResizedCropFlip(scale=TRAIN_CROP_SCALE, size=args.img_size),
               **mixing_options(args.aug, mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha,
                                prob=args.mixup_prob, mode=args.mixup_mode))
    if args.aug == "replay":
        source = ReplaySource(args.replay_dir, splits.class_names, size=args.img_size)
        return DiffMix(**mix, p=args.p, gamma=args.gamma, source=source), None, None, None
    if not strategy_of(args.aug):
        return DiffMix(**mix, p=0.0), None, None, None
    ring = pool = feedback = error = None
    if state.is_local_main_process:  # one ring and one generator pool per node, read by every local rank
        try:
            if args.gen_policy != "uniform" or args.strength_schedule:
                feedback = FeedbackBlock.create(len(splits.class_names))
            factory = generator_factory(args, splits, run_dir, image_size=args.ring_size or args.img_size,
                                        seed=args.seed, feedback=feedback, policy=args.gen_policy,
                                        policy_floor=args.gen_policy_floor, strength_schedule=args.strength_schedule)
            ring, pool = create_generator(
                factory, args.gen_device,
                workers_per_device=args.gen_workers_per_device, slots=args.ring_slots,
                image_size=args.ring_size or args.img_size, consumers=local_world(state), max_reuse=args.max_reuse,
                seed=args.seed, hang_timeout=args.gen_hang_timeout, cluster=args.gen_cluster,
                cluster_workers=args.gen_cluster_workers, cluster_gpus=args.gen_cluster_gpus)
        except (ValueError, FileNotFoundError) as failure:
            error = failure
            if feedback is not None:
                feedback.close()
    shared = gather(state, (ring.name if ring is not None else None, str(error) if error else None))
    if error is not None:
        raise error
    name, failure = shared[state.process_index - state.local_process_index]
    if failure:
        raise ValueError(f"local rank 0 could not set up the generator: {failure}")
    if ring is None:
        ring = SampleRing.attach(name, "consumer")
    return DiffMix(**mix, p=args.p, gamma=args.gamma, source=ring), ring, pool, feedback


def uses_personalisation(aug: str) -> bool:
    """Whether ``--aug`` runs a personalised generator (the real* baselines run the base model)."""
    strategy = strategy_of(aug)
    return strategy is not None and get_strategy(strategy).personalised


def personalise_first(args, state) -> None:
    """Make ``--gen-finetuned`` with ``onlinemix finetune`` unless it already holds a personalised
    generator; an interrupted run is resumed from its last checkpoint."""
    from onlinemix.finetune import latest_checkpoint
    from onlinemix.finetune import main as finetune
    from onlinemix.generator.components import PERSONALISATION_JSON

    if os.path.isfile(os.path.join(args.gen_finetuned, PERSONALISATION_JSON)):
        logger.info("using the personalised generator in %s", args.gen_finetuned)
        return
    if state.num_processes > 1:
        raise FileNotFoundError(
            f"{args.gen_finetuned!r} holds no personalised generator; make it before a multi-process run: "
            f"onlinemix finetune --config {args.gen_finetune_config} --out {args.gen_finetuned}")
    argv = ["--config", args.gen_finetune_config, "--out", args.gen_finetuned]
    if latest_checkpoint(args.gen_finetuned) is not None:
        argv.append("--resume")
    logger.info("personalising the generator first: onlinemix finetune %s", " ".join(argv))
    finetune(argv)


# -- model ------------------------------------------------------------------------------------


def resume_checkpoint(path: str, epochs: int) -> dict:
    """The checkpoint ``--resume`` names, checked before any work: written by train.py, not finished."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"--resume {path!r} is no train.py checkpoint: it lacks {missing}. Give a last.pth of a "
                         "run, or start from its model weights with --initial-checkpoint.")
    if checkpoint["epoch"] + 1 >= epochs:
        raise ValueError(f"--resume {path!r} has trained {checkpoint['epoch'] + 1} epochs already, and --epochs is "
                         f"{epochs}: nothing is left to train; pass a larger --epochs to train on.")
    return checkpoint


def load_model_state(model, weights: dict, path: str, recorded: dict) -> None:
    """``model.load_state_dict(weights)``, refused in one sentence when the checkpoint is another model's."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise ValueError(f"--resume {path!r} holds the weights of another model (it was trained with --model "
                         f"{recorded.get('model', '?')} on {recorded.get('data_dir', '?')}); resume with the same "
                         "--model and data set, or start a new run.") from None


def initial_weights(path: str) -> dict:
    """The tensors of ``--initial-checkpoint`` (safetensors, or a weights-only torch file: a plain state dict,
    or a train.py checkpoint's ``model``)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's and safetensors' errors on a cut, foreign or code-carrying file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--initial-checkpoint {path!r} cannot be read as weights ({reason}); pass a whole "
                         ".safetensors or .pth file of tensors.") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--initial-checkpoint {path!r} holds no state dict of tensors; pass model weights.")
    return state


# What train.py writes in a checkpoint and a resume needs.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best", "rng")


def build_model(args, num_classes):
    """The timm model: timm's pretrained weights with ``--pretrained``, a local file with ``--initial-checkpoint``."""
    import timm

    try:
        model = timm.create_model(args.model, num_classes=num_classes, pretrained=args.pretrained)
    except OSError as error:  # no network, no cached weights
        raise FileNotFoundError(
            f"--pretrained: timm could not fetch the pretrained weights of {args.model!r} "
            f"({str(error).splitlines()[0]}). Without network access, download them elsewhere and pass the file "
            "with --initial-checkpoint.") from None
    if args.initial_checkpoint:
        state = initial_weights(args.initial_checkpoint)
        # Keep what fits this model: a checkpoint's classifier for another class count does not.
        own = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        if not fitting:
            raise ValueError(f"--initial-checkpoint {args.initial_checkpoint!r}: none of its {len(state)} tensors fits "
                             f"--model {args.model} (another architecture?); pass weights of that model.")
        missing, _ = model.load_state_dict(fitting, strict=False)
        logger.info("loaded %s (%d tensors missing, e.g. the new classifier)", args.initial_checkpoint, len(missing))
    return model


# -- loop -----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    from accelerate import PartialState

    args = parse_args(argv)
    # Joins the process group torchrun or `accelerate launch` set up, if any (gloo on the CPU).
    state = PartialState(cpu=torch.device(args.device).type == "cpu")
    if state.num_processes > 1 and torch.device(args.device).type == "cuda":
        args.device = str(state.device)  # each rank its own GPU
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return train(args, state)
    finally:
        if state.num_processes > 1:
            state.destroy_process_group()


def train(args, state) -> dict:
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import random_seed
    from tqdm import tqdm

    random_seed(args.seed, state.process_index)  # each rank draws its own augmentations
    device = torch.device(args.device)
    resumed = resume_checkpoint(args.resume, args.epochs) if args.resume else None
    with state.main_process_first():  # the toy set or demo world is written once, before the others read it
        splits = load_splits(args.data_dir, **data_options(args))
    num_classes = len(splits.class_names)
    train_counts = np.bincount(splits.train.labels, minlength=num_classes)
    model = build_model(args, num_classes).to(device)
    if resumed is not None:  # another model's checkpoint stops here, before any folder is written
        load_model_state(model, resumed["model"], args.resume, resumed.get("args", {}))
    mean, std = normalisation(model)
    train_loader, sampler, eval_loaders = loaders(args, splits, state, mean, std)
    closed_loop = args.gen_policy != "uniform" or bool(args.strength_schedule)
    if closed_loop and args.feedback_every > args.epochs * len(train_loader):
        raise ValueError(f"--feedback-every {args.feedback_every} is more steps than the run has "
                         f"({args.epochs} epochs of {len(train_loader)}): the generator would never hear from the "
                         "classifier; pass a smaller --feedback-every.")
    # Rank 0's choice for every rank: the time, and which folders exist, may differ by the time the others look.
    run_dir = gather(state, run_folder(args.output, args.name or time.strftime("%Y%m%d-%H%M%S"),
                                       resume=bool(args.resume)))[0]
    fresh = state.is_main_process and not os.path.isdir(run_dir)
    ring = pool = feedback = None
    try:
        if args.gen_finetune_config and uses_personalisation(args.aug):
            personalise_first(args, state)
        # Checks the replay folder and every generator setting against the data before the run folder is
        # written (only --gen-model tiny is written into it, once checked).
        mix, ring, pool, feedback = build_augmentation(args, splits, run_dir, state, mean, std)
        if state.is_main_process:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "args.yaml"), "w") as f:
                yaml.safe_dump(vars(args), f, sort_keys=True)
        fidelity = FidelityMonitor()

        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum)
        warmup = args.warmup_epochs * args.epochs if args.warmup_epochs < 1 else args.warmup_epochs
        steps_per_epoch = len(train_loader)
        loop = None  # with the uniform policy and no schedule, nothing of the closed loop runs
        if closed_loop:
            loop = ClosedLoop(num_classes, feedback, every=args.feedback_every,
                              total_steps=args.epochs * steps_per_epoch, gather=lambda value: gather(state, value))
        scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch,
                                      warmup_t=int(warmup * steps_per_epoch), warmup_lr_init=args.lr * 0.01,
                                      t_in_epochs=False)
        amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        loss_fn = SoftTargetCrossEntropy()

        start_epoch, best = 0, -1.0
        steps_path = os.path.join(run_dir, "steps.csv")
        if resumed is not None:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            scaler.load_state_dict(resumed["scaler"])
            start_epoch, best = resumed["epoch"] + 1, resumed["best"]
            if len(resumed["rng"]) == state.num_processes:
                set_rng_state(resumed["rng"][state.process_index])
            if state.is_main_process:
                trim_steps(steps_path, start_epoch)  # the interrupted epoch's steps: they are run again
            logger.info("resumed from %s: going on with epoch %d/%d", args.resume, start_epoch + 1, args.epochs)
            del resumed
    except BaseException:
        close_generator(ring, pool, feedback)
        if fresh:  # refused while setting up: no run folder is left behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    forward = model
    if state.num_processes > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        forward = torch.compile(forward)

    board = tensorboard(run_dir) if state.is_main_process else None
    grid = SampleGrid(splits.class_names)
    metrics_path, csv_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "metrics.csv")
    columns = metrics_columns({name: loader.dataset.split.groups is not None for name, loader in eval_loaders.items()})
    result, heatmap_pairs, failed_write, trained = {}, None, False, False
    try:
        if pool is not None:
            pool.start().warm_up(args.batch_size, timeout=args.gen_warmup)
        state.wait_for_everyone()
        trained = True
        for epoch in range(start_epoch, args.epochs):
            model.train()
            sampler.set_epoch(epoch)
            losses = []
            # On a terminal only (disable=None): in a log file the epoch's line says it all.
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True,
                       disable=None if state.is_main_process else True)
            for step, (x, y) in enumerate(bar):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                labels = y
                x, y = mix(x, y)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = forward(x)
                    loss = loss_fn(logits.float(), y)
                fidelity.update(logits, mix.synthetic)
                if state.is_main_process:
                    grid.add(mix.recent, mix.synthetic, logits)
                if loop is not None:
                    loop.step(epoch * steps_per_epoch + step, logits, labels, mix.synthetic)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step_update(epoch * steps_per_epoch + step + 1)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if state.is_main_process and step % args.log_interval == 0:
                    log_step(steps_path, epoch, step, losses[-1], optimizer.param_groups[0]["lr"])
            augmentation = gather(state, mix.stats())
            calls = FidelityMonitor.merge(gather(state, fidelity.state()))
            policy = loop.epoch_state() if loop is not None else None
            fidelity.reset()
            evaluated = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
            if state.is_main_process:
                result = epoch_report(args, epoch, losses, optimizer, augmentation, calls, ring, pool,
                                      eval_loaders if evaluated else {}, model, device, num_classes, amp_dtype,
                                      train_counts)
                if policy is not None:
                    result["policy"] = {"name": args.gen_policy, **{k: v for k, v in policy.items()
                                                                      if k not in ("confusion", "pairs")}}
            # After evaluation, which draws from the RNG too: a resumed run starts where this one goes on.
            rng = gather(state, rng_state())
            if state.is_main_process:
                write_metrics(result, metrics_path, csv_path, columns)  # first: a failed checkpoint loses none
                # Without a validation split the latest evaluated epoch is the best.
                score = result.get("val", {}).get("top1", -epoch) if evaluated else best
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                              "best": max(best, score), "rng": rng, "args": vars(args)}
                failed_write = write_or_warn(checkpoint, os.path.join(run_dir, "last.pth"), failed_write)
                if evaluated and score > best and not failed_write:
                    best = score
                    failed_write = write_or_warn(checkpoint, os.path.join(run_dir, "best.pth"), failed_write)
                grid.save(os.path.join(run_dir, f"synthetic-epoch{epoch + 1:03d}.png"), epoch + 1)
                if policy is not None:
                    # Drawn at evaluations only: a figure every epoch would slow the trainer, which gives
                    # the generator more time and so changes the synthetic budget against uniform runs.
                    heatmap_pairs = policy["pairs"] + (heatmap_pairs if heatmap_pairs is not None else 0)
                    if evaluated:
                        save_policy_heatmap(policy["confusion"], heatmap_pairs, splits.class_names,
                                            os.path.join(run_dir, f"policy-epoch{epoch + 1:03d}.png"))
                        heatmap_pairs = None
                if board is not None:
                    for key, value in flat_scalars(result).items():
                        board.add_scalar(key, value, epoch + 1)
                    board.flush()
            state.wait_for_everyone()
    finally:
        if board is not None:
            board.close()
        close_generator(ring, pool, feedback)
        if fresh and not trained:  # the generator failed its warm-up: nothing was trained, nothing is kept
            shutil.rmtree(run_dir, ignore_errors=True)
    if state.is_main_process and result:
        logger.info(run_summary(run_dir, result, best if "val" in eval_loaders else None))
    return result


def close_generator(ring, pool, feedback) -> None:
    """Stop the generator pool, then close the ring and the feedback block (each may be None)."""
    if pool is not None:
        pool.stop()
    if ring is not None:
        ring.close()
    if feedback is not None:
        feedback.close()


def write_or_warn(checkpoint: dict, path: str, failed_before: bool) -> bool:
    """Write ``checkpoint``; when the disk refuses (full, gone), keep the previous file, warn with the free
    space and go on, and stop the run cleanly when the write before failed too. Returns whether this one failed."""
    try:
        save_checkpoint(checkpoint, path)
        return False
    except OSError as error:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        message = (f"could not write {path} ({error.strerror or error}; {free / 2**20:.0f} MiB free there); "
                   "the previous checkpoint is kept")
        if failed_before:
            raise CheckpointWriteError(f"{message}, and the write before failed too, so the run stops: free some "
                                       "space and continue with --resume on the last checkpoint.") from None
        logger.warning("%s; training goes on and writes again after the next epoch.", message)
        return True


def epoch_report(args, epoch, losses, optimizer, augmentation, calls, ring, pool, eval_loaders, model, device,
                 num_classes, amp_dtype, train_counts) -> dict:
    """Rank 0's summary of an epoch: losses, augmentation over all ranks, what the classifier called the
    synthetic samples (``FidelityMonitor``, merged ``calls``), ring, generator, evaluation."""
    totals = {k: sum(s[k] for s in augmentation) for k in ("samples", "requested", "replaced", "shortfall")}
    totals["replaced_fraction"] = totals["replaced"] / totals["samples"] if totals["samples"] else 0.0
    result = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
              "augmentation": totals}
    if calls:
        result["fidelity"] = FidelityMonitor.summary(calls)
    if ring is not None:
        result["ring"] = ring.stats()
    if pool is not None:
        result["generator"] = pool.stats()
    for name, loader in eval_loaders.items():
        result[name] = evaluate(model, loader, device, num_classes, amp_dtype,
                                train_counts if args.imbalance_factor else None, args.shot_thresholds)
    accuracy = ", ".join(f"{name} top1 {result[name]['top1']:.4f}" for name in eval_loaders) or "not evaluated"
    called = ""
    if calls:
        shares = result["fidelity"]["all"]
        first = f", target on first reads {shares['first_read']['target']:.2f}" if "first_read" in shares else ""
        called = f" (classifier calls it target {shares['target']:.2f}, source {shares['source']:.2f}{first})"
    logger.info("epoch %d: loss %.4f, %s, synthetic %.3f%s", epoch + 1, result["train_loss"], accuracy,
                totals["replaced_fraction"], called)
    return result


# What a user's input or machine can cause: said in one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError, CheckpointWriteError, GeneratorStartError)


def cli(argv=None) -> None:
    """``python train.py``: ``main``, with an error the user can fix said as ``error: ...`` and exit status 1."""
    try:
        main(argv)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
