"""The options of ``train.py`` and their checks: every setting that cannot run is refused here, in one
sentence, before any data is read, model loaded or folder written.

``parse_args`` reads flags over an optional YAML file (``--config``); with no arguments at all it runs
the demo (``configs/demo.yaml``). The data options come from ``onlinemix.options.add_data_arguments``
and the generator's from ``add_generator_arguments``; the rest (model, optimisation, augmentation,
closed loop, ring) are train.py's own.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import torch

from .augmentation import AUGMENTATIONS, augmentation_name, strategy_of
from .data import check_data_options
from .options import (HelpFormatter, add_data_arguments, add_generator_arguments, check_generator_args,
                      data_options, parse_with_config)
from .plan import POLICIES, closed_loop


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """train.py's parser; ``description`` heads its ``--help``."""
    p = argparse.ArgumentParser(prog="train.py", description=description, formatter_class=HelpFormatter)
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
    gen.add_argument("--gen-budget", type=int, metavar="SAMPLES",
                     help="unique synthetic samples the generator may make over the run, spread evenly over the "
                          "epochs; reuse (up to --max-reuse) serves the rest of --p (default: no limit)")
    gen.add_argument("--gen-hang-timeout", type=float, default=600.0, metavar="SECONDS",
                     help="a generator worker that sends no heartbeat this long counts as hung and is restarted")
    gen.add_argument("--gen-warmup", type=float, default=60.0,
                     help="seconds to wait, at most, for the ring to hold one batch of samples before training")
    return p


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def parse_args(argv=None, *, description: str = "") -> argparse.Namespace:
    """train.py's options from ``argv`` (default: ``sys.argv``), checked by ``check_args``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # the quick start: `python train.py` runs the demo
        print(f"No arguments: running the demo ({os.path.relpath(DEMO_CONFIG)}); `python train.py --help` lists "
              "the options.", flush=True)
        argv = ["--config", DEMO_CONFIG]
    args = parse_with_config(build_parser(description), argv)
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
        check_generator_args(args)  # now, not after personalising the generator first
        for flag in ("ring_slots", "max_reuse", "ring_size", "gen_budget"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}.")
    elif closed_loop(args.gen_policy, args.strength_schedule):
        raise ValueError(f"--gen-policy and --strength-schedule steer a generator; --aug {args.aug} runs none.")
    elif args.gen_budget is not None:
        raise ValueError(f"--gen-budget caps an online generator's samples; --aug {args.aug} runs none (an offline "
                         "set's size is `onlinemix generate --count`).")
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
    """``device`` a torch device this machine has; ``flag`` names the option in the error."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{flag} {device!r} is not a device; use e.g. cpu, cuda, cuda:1.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if (parsed.index or 0) >= count:
            raise ValueError(f"{flag} {device} is not available: this machine has {count} CUDA device(s); "
                             "pass another device, or cpu.")


def check_feedback_every(args, steps_per_epoch: int) -> None:
    """A closed loop publishes the classifier's confusion at least once in the run."""
    total = args.epochs * steps_per_epoch
    if closed_loop(args.gen_policy, args.strength_schedule) and args.feedback_every > total:
        raise ValueError(f"--feedback-every {args.feedback_every} is more steps than the run has "
                         f"({args.epochs} epochs of {steps_per_epoch}): the generator would never hear from the "
                         "classifier; pass a smaller --feedback-every.")
