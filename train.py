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
import os
import sys
import time
import warnings

import numpy as np
import torch
import yaml

from onlinemix.augmentation import AUGMENTATIONS, augmentation_name, create_generator, mixing_options, strategy_of
from onlinemix.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from onlinemix.data import SplitImages, check_data_options, load_splits
from onlinemix.evaluation import evaluate
from onlinemix.fidelity import FidelityMonitor
from onlinemix.feedback import ClosedLoop, FeedbackBlock
from onlinemix.options import (add_data_arguments, add_generator_arguments, check_generator_args, data_options,
                               generator_factory, parse_with_config)
from onlinemix.plan import POLICIES, check_policy, get_strategy
from onlinemix.run_files import flat_scalars, log_step, save_grid, save_policy_heatmap, tensorboard, write_metrics

# RandomResizedCrop's area range for real training images; synthetic images get the same crop.
TRAIN_CROP_SCALE = (0.35, 1.0)
logger = logging.getLogger("onlinemix")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    model.add_argument("--img-size", type=int, default=224)
    model.add_argument("--batch-size", type=int, default=64)
    model.add_argument("--epochs", type=int, default=128)
    model.add_argument("--opt", choices=["sgd", "adamw"], default="sgd")
    model.add_argument("--lr", type=float, default=0.02)
    model.add_argument("--momentum", type=float, default=0.9)
    model.add_argument("--weight-decay", type=float, default=5e-5)
    model.add_argument("--warmup-epochs", type=float, default=0.1, help="linear warm-up, as a share of --epochs if < 1")
    model.add_argument("--smoothing", type=float, default=0.1)
    model.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    model.add_argument("--channels-last", action="store_true")
    model.add_argument("--compile", action="store_true", help="torch.compile the classifier")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--workers", type=int, default=4)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--output", default="runs")
    model.add_argument("--name", help="run folder name (default: derived from the time)")
    model.add_argument("--resume", help="checkpoint to continue from")
    model.add_argument("--log-interval", type=int, default=50)
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
    aug.add_argument("--gamma", type=float, default=0.5)
    aug.add_argument("--mixup-alpha", type=float, default=1.0)
    aug.add_argument("--cutmix-alpha", type=float, default=1.0)
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
    gen.add_argument("--gen-workers-per-device", type=int, default=1)
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
    gen.add_argument("--ring-slots", type=int, default=512)
    gen.add_argument("--ring-size", type=int, help="image size in the ring (default --img-size)")
    gen.add_argument("--max-reuse", type=int, default=4)
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
    if args.mixup_prob is not None and not 0 <= args.mixup_prob <= 1:
        raise ValueError(f"--mixup-prob must lie in [0, 1], got {args.mixup_prob}.")
    if args.pretrained and args.initial_checkpoint:
        raise ValueError("--pretrained (timm's weights) and --initial-checkpoint FILE both choose the starting "
                         "weights; pass one.")
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        raise FileNotFoundError(f"--initial-checkpoint {args.initial_checkpoint!r} is not a file.")
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
        if args.initial_checkpoint.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(args.initial_checkpoint)
        else:
            state = torch.load(args.initial_checkpoint, map_location="cpu", weights_only=True)
        # Keep what fits this model: a checkpoint's classifier for another class count does not.
        own = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
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
    run_dir = os.path.join(args.output, args.name or time.strftime("%Y%m%d-%H%M%S"))
    if state.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.yaml"), "w") as f:
            yaml.safe_dump(vars(args), f, sort_keys=True)
    with state.main_process_first():  # the toy set or demo world is written once, before the others read it
        splits = load_splits(args.data_dir, **data_options(args))
    num_classes = len(splits.class_names)
    train_counts = np.bincount(splits.train.labels, minlength=num_classes)
    model = build_model(args, num_classes).to(device)
    mean, std = normalisation(model)
    train_loader, sampler, eval_loaders = loaders(args, splits, state, mean, std)
    if args.gen_finetune_config and uses_personalisation(args.aug):
        personalise_first(args, state)
    mix, ring, pool, feedback = build_augmentation(args, splits, run_dir, state, mean, std)
    fidelity = FidelityMonitor()

    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    warmup = args.warmup_epochs * args.epochs if args.warmup_epochs < 1 else args.warmup_epochs
    steps_per_epoch = len(train_loader)
    loop = None  # with the uniform policy and no schedule, nothing of the closed loop runs
    if args.gen_policy != "uniform" or args.strength_schedule:
        loop = ClosedLoop(num_classes, feedback, every=args.feedback_every, total_steps=args.epochs * steps_per_epoch,
                          gather=lambda value: gather(state, value))
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch,
                                  warmup_t=int(warmup * steps_per_epoch), warmup_lr_init=args.lr * 0.01,
                                  t_in_epochs=False)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    loss_fn = SoftTargetCrossEntropy()

    start_epoch, best = 0, -1.0
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best = checkpoint["epoch"] + 1, checkpoint["best"]
        if len(checkpoint["rng"]) == state.num_processes:
            set_rng_state(checkpoint["rng"][state.process_index])
        logger.info("resumed from %s at epoch %d", args.resume, start_epoch)
    forward = model
    if state.num_processes > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        forward = torch.compile(forward)

    board = tensorboard(run_dir) if state.is_main_process else None
    metrics_path, csv_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "metrics.csv")
    steps_path = os.path.join(run_dir, "steps.csv")
    result, heatmap_pairs = {}, None
    try:
        if pool is not None:
            pool.start().warm_up(args.batch_size, timeout=args.gen_warmup)
        state.wait_for_everyone()
        for epoch in range(start_epoch, args.epochs):
            model.train()
            sampler.set_epoch(epoch)
            losses = []
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True,
                       disable=not state.is_main_process)
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
                # Without a validation split the latest evaluated epoch is the best.
                score = result.get("val", {}).get("top1", -epoch) if evaluated else best
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                              "best": max(best, score), "rng": rng, "args": vars(args)}
                save_checkpoint(checkpoint, os.path.join(run_dir, "last.pth"))
                if evaluated and score > best:
                    best = score
                    save_checkpoint(checkpoint, os.path.join(run_dir, "best.pth"))
                save_grid(mix.recent, fidelity.recent_predictions,
                          os.path.join(run_dir, f"synthetic-epoch{epoch + 1:03d}.png"))
                if policy is not None:
                    # Drawn at evaluations only: a figure every epoch would slow the trainer, which gives
                    # the generator more time and so changes the synthetic budget against uniform runs.
                    heatmap_pairs = policy["pairs"] + (heatmap_pairs if heatmap_pairs is not None else 0)
                    if evaluated:
                        save_policy_heatmap(policy["confusion"], heatmap_pairs, splits.class_names,
                                            os.path.join(run_dir, f"policy-epoch{epoch + 1:03d}.png"))
                        heatmap_pairs = None
                write_metrics(result, metrics_path, csv_path)
                if board is not None:
                    for key, value in flat_scalars(result).items():
                        board.add_scalar(key, value, epoch + 1)
                    board.flush()
            state.wait_for_everyone()
    finally:
        if board is not None:
            board.close()
        if pool is not None:
            pool.stop()
        if ring is not None:
            ring.close()
        if feedback is not None:
            feedback.close()
    return result


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


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
