#!/usr/bin/env python
"""Train a timm classifier with online Diff-Mix (or a sibling strategy) as augmentation.

    python train.py                                  # no arguments: the demo (configs/demo.yaml)
    python train.py --config configs/toy.yaml
    python train.py --data-dir data/cub --metaclass bird --aug diffmix --gen-device cuda:1 \\
        --gen-model /models/stable-diffusion-v1-5 --gen-finetuned runs/cub-ti-db

A YAML file (``--config``) sets defaults and flags override them; the resolved
arguments are written to the run directory with metrics (JSON lines and CSV),
checkpoints (last and best on validation, written atomically) and sample grids.
This file is the recipe, read top to bottom: data, model, augmentation and generator,
optimisation, then the loop of ``train_one_epoch`` and ``evaluate_epoch``. The options and
their checks live in ``onlinemix.train_options``, what a run writes in ``onlinemix.run_files``,
the algorithms elsewhere in ``onlinemix`` (``ARCHITECTURE.md`` maps them). Several processes
(torchrun, ``accelerate launch``) join through accelerate's ``PartialState``.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

import numpy as np
import torch

from onlinemix import train_options
from onlinemix.augmentation import OnlineGenerator, create_ring_and_pool, mixing_options, strategy_of
from onlinemix.checkpoint import (CheckpointWriteError, load_fitting_weights, load_model_state, resume_checkpoint,
                                  rng_state, set_rng_state)
from onlinemix.data import load_splits
from onlinemix.data.loaders import TRAIN_CROP_SCALE, loaders, normalisation
from onlinemix.evaluation import evaluate
from onlinemix.feedback import ClosedLoop, FeedbackBlock
from onlinemix.fidelity import FidelityMonitor
from onlinemix.finetune import personalise_first
from onlinemix.optimisation import Optimisation
from onlinemix.options import data_options, generator_factory
from onlinemix.plan import closed_loop, get_strategy
from onlinemix.pool import GeneratorStartError
from onlinemix.ranks import gather, local_world, made_on_node_main
from onlinemix.run_files import RunRecorder, epoch_line
from onlinemix.supply import SupplyMonitor

logger = logging.getLogger("onlinemix")


def parse_args(argv=None):
    """The options of ``argv`` (default ``sys.argv``), checked; none at all: the demo."""
    return train_options.parse_args(argv, description=__doc__)


def build_model(args, num_classes: int, resumed: Optional[dict] = None) -> torch.nn.Module:
    """The timm model: timm's pretrained weights with ``--pretrained``, a local file with
    ``--initial-checkpoint``, a ``--resume`` checkpoint's weights (refused if another model's)."""
    import timm

    try:
        model = timm.create_model(args.model, num_classes=num_classes, pretrained=args.pretrained)
    except OSError as error:  # no network, no cached weights
        raise FileNotFoundError(
            f"--pretrained: timm could not fetch the pretrained weights of {args.model!r} "
            f"({str(error).splitlines()[0]}). Without network access, download them elsewhere and pass the file "
            "with --initial-checkpoint.") from None
    if args.initial_checkpoint:
        load_fitting_weights(model, args.initial_checkpoint, args.model)
    if resumed is not None:
        load_model_state(model, resumed, args.resume)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def build_augmentation(args, splits, run_dir, state, mean, std) -> tuple:
    """The batch transform (``DiffMix``) and, for generator strategies, the ``OnlineGenerator``: ring,
    generator pool and, for a closed loop, feedback block, made on each node's local rank 0."""
    from onlinemix import DiffMix, RandomResizedCropFlip, ReplaySource, SampleRing

    mix = dict(num_classes=len(splits.class_names), label_smoothing=args.smoothing, mean=mean, std=std,
               synthetic_transform=RandomResizedCropFlip(scale=TRAIN_CROP_SCALE, size=args.img_size),
               **mixing_options(args.aug, mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha,
                                prob=args.mixup_prob, mode=args.mixup_mode))
    if args.aug == "replay":
        source = ReplaySource(args.replay_dir, splits.class_names, size=args.img_size)
        return DiffMix(**mix, p=args.p, gamma=args.gamma, source=source), None
    if not strategy_of(args.aug):
        return DiffMix(**mix, p=0.0), None
    image_size = args.ring_size or args.img_size

    def make() -> OnlineGenerator:  # one ring and one generator pool per node, read by every local rank
        loop = closed_loop(args.gen_policy, args.strength_schedule)
        feedback = FeedbackBlock.create(len(splits.class_names)) if loop else None
        try:
            factory = generator_factory(args, splits, run_dir, image_size=image_size, seed=args.seed,
                                        feedback=feedback)
            ring, pool = create_ring_and_pool(
                factory, args.gen_device, workers_per_device=args.gen_workers_per_device, slots=args.ring_slots,
                image_size=image_size, consumers=local_world(state), max_reuse=args.max_reuse, seed=args.seed,
                hang_timeout=args.gen_hang_timeout, cluster=args.gen_cluster,
                cluster_workers=args.gen_cluster_workers, cluster_gpus=args.gen_cluster_gpus)
        except BaseException:
            if feedback is not None:
                feedback.close()
            raise
        return OnlineGenerator(ring, pool, feedback)

    generator, ring_name = made_on_node_main(state, make, lambda made: made.ring.name)
    if generator is None:
        generator = OnlineGenerator(SampleRing.attach(ring_name, "consumer"))
    return DiffMix(**mix, p=args.p, gamma=args.gamma, source=generator.ring), generator


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
        return run(args, state)
    finally:
        if state.num_processes > 1:
            state.destroy_process_group()


def run(args, state) -> dict:
    """Train ``args``' run on this process of ``state``; returns the last epoch's metrics (rank 0)."""
    from timm.utils import random_seed

    random_seed(args.seed, state.process_index)  # each rank draws its own augmentations
    resumed = resume_checkpoint(args.resume, args.epochs) if args.resume else None
    with state.main_process_first():  # the toy set or demo world is written once, before the others read it
        splits = load_splits(args.data_dir, **data_options(args))
    model = build_model(args, len(splits.class_names), resumed).to(args.device)
    mean, std = normalisation(model)
    train_loader, sampler, eval_loaders = loaders(splits, state, mean, std, img_size=args.img_size,
                                                  batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    train_options.check_feedback_every(args, len(train_loader))
    # Rank 0's choice for every rank: the time, and which folders exist, may differ by the time the others look.
    run_dir = gather(state, train_options.run_folder(args.output, args.name or time.strftime("%Y%m%d-%H%M%S"),
                                                     resume=bool(args.resume)))[0]
    if args.gen_finetune_config and strategy_of(args.aug) and get_strategy(strategy_of(args.aug)).personalised:
        personalise_first(args.gen_finetuned, args.gen_finetune_config, num_processes=state.num_processes)
    # The replay folder and every generator setting are checked against the data before the run folder is
    # written (only --gen-model tiny is written into it, once checked).
    mix, generator = build_augmentation(args, splits, run_dir, state, mean, std)
    recorder = trained = None
    try:
        recorder = RunRecorder(run_dir, splits.class_names, {name: loader.dataset.split.groups is not None
                                                             for name, loader in eval_loaders.items()},
                               args=vars(args), main=state.is_main_process, log_interval=args.log_interval)
        optimisation = Optimisation.create(args, model, len(train_loader))
        loop = None  # with the uniform policy and no schedule, nothing of the closed loop runs
        if closed_loop(args.gen_policy, args.strength_schedule):
            loop = ClosedLoop(len(splits.class_names), generator.feedback, every=args.feedback_every,
                              total_steps=args.epochs * len(train_loader), gather=lambda value: gather(state, value))
        start_epoch = resume_training(args, resumed, optimisation, recorder, state) if resumed else 0
        del resumed
        forward = model
        if state.num_processes > 1:
            device = torch.device(args.device)
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            forward = torch.compile(forward)
        supply = SupplyMonitor.for_run(args, generator, len(splits.train), start_epoch) if generator else None
        if generator is not None and generator.pool is not None:
            supply.open_epoch(start_epoch)  # the first limit, before a worker starts
            limit = supply.limit(start_epoch)
            generator.pool.start().warm_up(args.batch_size if limit is None else min(args.batch_size, limit),
                                           timeout=args.gen_warmup)
        state.wait_for_everyone()
        trained, result = True, {}
        fidelity = FidelityMonitor()
        train_counts = np.bincount(splits.train.labels, minlength=len(splits.class_names))
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            if supply is not None:
                supply.open_epoch(epoch)
            losses = train_one_epoch(args, epoch, forward, train_loader, mix, optimisation, fidelity, loop, recorder,
                                     show_progress=state.is_main_process)
            augmentation, calls = gather(state, mix.stats()), FidelityMonitor.merge(gather(state, fidelity.state()))
            fidelity.reset()
            policy = loop.epoch_state() if loop is not None else None
            evaluated = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
            if state.is_main_process:
                result = evaluate_epoch(args, epoch, losses, optimisation, augmentation, calls, generator, supply,
                                        eval_loaders if evaluated else {}, model, train_counts)
                if policy is not None:
                    result["policy"] = {"name": args.gen_policy, **{k: v for k, v in policy.items()
                                                                      if k not in ("confusion", "pairs")}}
            # After evaluation, which draws from the RNG too: a resumed run starts where this one goes on.
            rng = gather(state, rng_state())
            if state.is_main_process:
                recorder.epoch(result, {"model": model.state_dict(), **optimisation.state_dict(), "rng": rng},
                               evaluated=evaluated, policy=policy)
            state.wait_for_everyone()
    finally:
        if recorder is not None:
            recorder.close(trained=bool(trained))
        if generator is not None:
            generator.close()
    if state.is_main_process and result:
        logger.info(recorder.summary(result, validated="val" in eval_loaders))
    return result


def resume_training(args, resumed: dict, optimisation: Optimisation, recorder: RunRecorder, state) -> int:
    """Restore the optimisation, the best score and every rank's random states; returns the epoch to train next."""
    optimisation.load_state_dict(resumed)
    start_epoch = resumed["epoch"] + 1
    if len(resumed["rng"]) == state.num_processes:
        set_rng_state(resumed["rng"][state.process_index])
    recorder.resumed(start_epoch, resumed["best"])
    logger.info("resumed from %s: going on with epoch %d/%d", args.resume, start_epoch + 1, args.epochs)
    return start_epoch


def train_one_epoch(args, epoch, forward, loader, mix, optimisation, fidelity, loop, recorder, *,
                    show_progress: bool) -> list:
    """One pass over ``loader``: each batch through ``mix`` (synthetic samples, soft targets), the model,
    the loss on soft targets and an optimiser step. Returns the loss of every step."""
    from timm.loss import SoftTargetCrossEntropy
    from tqdm import tqdm

    forward.train()
    device, loss_fn, losses = torch.device(args.device), SoftTargetCrossEntropy(), []
    # On a terminal only (disable=None): in a log file the epoch's line says it all.
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True,
               disable=None if show_progress else True)
    for step, (x, labels) in enumerate(bar):
        update = epoch * len(loader) + step
        x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        x, y = mix(x, labels)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=optimisation.amp_dtype, enabled=optimisation.amp_dtype is not None):
            logits = forward(x)
            loss = loss_fn(logits.float(), y)
        fidelity.update(logits, mix.synthetic)
        if loop is not None:
            loop.step(update, logits, labels, mix.synthetic)
        optimisation.step(loss, update + 1)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        recorder.step(epoch, step, losses[-1], optimisation.optimizer.param_groups[0]["lr"], mix, logits)
    return losses


def evaluate_epoch(args, epoch, losses, optimisation, augmentation, calls, generator, supply, eval_loaders, model,
                   train_counts) -> dict:
    """Rank 0's summary of an epoch: losses, augmentation over all ranks (totals since the start), what the
    classifier called the synthetic samples (``FidelityMonitor``, merged ``calls``), ring, generator, the
    epoch's supply against demand (``SupplyMonitor``), evaluation on ``eval_loaders``."""
    totals = {k: sum(s[k] for s in augmentation) for k in ("samples", "requested", "replaced", "shortfall")}
    totals["replaced_fraction"] = totals["replaced"] / totals["samples"] if totals["samples"] else 0.0
    result = {"epoch": epoch, "train_loss": float(np.mean(losses)),
              "lr": optimisation.optimizer.param_groups[0]["lr"], "augmentation": totals}
    if calls:
        result["fidelity"] = FidelityMonitor.summary(calls)
    if generator is not None:
        result["ring"] = generator.ring.stats()
        if generator.pool is not None:
            result["generator"] = generator.pool.stats()
        result["supply"] = supply.close_epoch(totals)
    for name, loader in eval_loaders.items():
        result[name] = evaluate(model, loader, torch.device(args.device), len(train_counts), optimisation.amp_dtype,
                                train_counts if args.imbalance_factor else None, args.shot_thresholds)
    logger.info(epoch_line(result))
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
