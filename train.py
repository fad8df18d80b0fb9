#!/usr/bin/env python
"""Train a timm classifier with online Diff-Mix (or a sibling strategy) as augmentation.

    python train.py                                  # no arguments: the demo (configs/demo.yaml)
    python train.py --config configs/toy.yaml
    python train.py --data-dir data/cub --metaclass bird --aug diffmix --gen-device cuda:1 \\
        --gen-model /models/stable-diffusion-v1-5 --gen-finetuned runs/cub-ti-db

A YAML file (``--config``) sets defaults and flags override them; the resolved
arguments are written to the run directory with metrics (JSON lines and CSV),
checkpoints (last and best on validation, written atomically) and sample grids.
This file wires the pieces of ``onlinemix`` together; the algorithms live there.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import yaml

from onlinemix.cli import parse_with_config
from onlinemix.data import add_data_arguments, check_data_arguments, load_splits
from onlinemix.fidelity import FidelityMonitor

AUGS = ("none", "mixup", "cutmix", "diffmix", "diffmix+cutmix", "diffaug", "diffgen", "realmix", "realaug",
        "realguidance", "realgen", "realfilter", "dafusion", "replay")
STRATEGY_OF_AUG = {"diffmix": "diff-mix", "diffmix+cutmix": "diff-mix", "diffaug": "diff-aug", "diffgen": "diff-gen",
                   "realmix": "real-mix", "realaug": "real-aug", "realguidance": "real-guidance",
                   "realgen": "real-gen", "realfilter": "real-filtering", "dafusion": "da-fusion"}
# The paper's baselines, as its code runs them: CutMix per sample with probability 0.1, Mixup per batch with
# probability 0.3 (both with alpha 1). --mixup-prob and --mixup-mode override them.
PAPER_MIXING = {"mixup": dict(prob=0.3, mode="batch"), "cutmix": dict(prob=0.1, mode="elem")}
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
    aug.add_argument("--aug", choices=AUGS, default="diffmix")
    # --replace-prob: torchrun's own parser mistakes a bare --p for an abbreviation of its --print-completion.
    aug.add_argument("--p", "--replace-prob", dest="p", type=float, default=0.1,
                     help="per-sample synthetic replacement probability (under torchrun, spell it --replace-prob)")
    aug.add_argument("--gamma", type=float, default=0.5)
    aug.add_argument("--strengths", type=float, nargs="+", help="SDEdit strengths (default: the strategy's)")
    aug.add_argument("--mixup-alpha", type=float, default=1.0)
    aug.add_argument("--cutmix-alpha", type=float, default=1.0)
    aug.add_argument("--mixup-prob", type=float,
                     help="probability of applying Mixup/CutMix, per batch or per sample by --mixup-mode "
                          "(default: the paper's, 0.3 for mixup and 0.1 for cutmix)")
    aug.add_argument("--mixup-mode", choices=["batch", "pair", "elem"],
                     help="timm's mixing mode (default: the paper's, batch for mixup and elem -- per sample -- "
                          "for cutmix)")
    aug.add_argument("--referable-classes", type=int,
                     help="inter-class strategies: each target class takes references from only this many "
                          "source classes, chosen at random (the paper's Fig. 7b)")
    aug.add_argument("--replay-dir", help="output folder of the offline Diff-Mix sampler (--aug replay)")
    gen = p.add_argument_group("generator")
    gen.add_argument("--gen-device", nargs="+", default=["cuda:1"], help="one or more devices, 'cpu' allowed")
    gen.add_argument("--gen-workers-per-device", type=int, default=1)
    gen.add_argument("--gen-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                     help="diffusers folder or hub id; 'demo': the shipped demo generator; "
                          "'tiny': an untrained tiny model (smoke runs only)")
    gen.add_argument("--gen-finetuned", help="personalised generator folder (onlinemix finetune)")
    gen.add_argument("--gen-finetune-config",
                     help="finetune YAML: if --gen-finetuned holds no personalised generator yet, make it first "
                          "(onlinemix finetune --config FILE --out GEN_FINETUNED); later runs reuse it")
    gen.add_argument("--gen-steps", type=int, default=25)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--gen-resolution", type=int, default=512)
    gen.add_argument("--gen-batch-size", type=int, default=8)
    gen.add_argument("--gen-dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    gen.add_argument("--clip-filter",
                     help="CLIP folder or hub id (the paper's openai/clip-vit-base-patch32): drop the 10%% of "
                          "samples least confidently showing a --metaclass; needed by --aug realfilter")
    gen.add_argument("--ring-slots", type=int, default=512)
    gen.add_argument("--ring-size", type=int, help="image size in the ring (default --img-size)")
    gen.add_argument("--max-reuse", type=int, default=4)
    gen.add_argument("--gen-warmup", type=float, default=60.0,
                     help="seconds to wait, at most, for the ring to hold one batch of samples before training")
    gen.add_argument("--local-files-only", action="store_true", help="never reach a model hub")
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
    check_data_arguments(args)
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
    if args.aug in STRATEGY_OF_AUG:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Dist:
    """This process's place in a torchrun / ``accelerate launch`` job (one process: rank 0 of 1)."""

    def __init__(self, rank=0, world=1, local_rank=0, local_world=1):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        return self.local_rank == 0

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(args) -> Dist:
    """Join the process group that torchrun or ``accelerate launch`` set up, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if torch.device(args.device).type == "cuda":
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return Dist(rank, world, local_rank, local_world)


# -- data -------------------------------------------------------------------------------


class Images(torch.utils.data.Dataset):
    def __init__(self, split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.transform(self.split.image(i)), self.split.labels[i]


def normalisation(model) -> tuple:
    """The mean and std the model's pretrained weights expect (timm's pretrained config; ImageNet's by default)."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    config = getattr(model, "pretrained_cfg", None) or {}
    return tuple(config.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(config.get("std", IMAGENET_DEFAULT_STD))


def transforms(img_size: int, mean, std):
    from torchvision import transforms as T

    normalise = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([T.RandomResizedCrop(img_size, scale=TRAIN_CROP_SCALE), T.RandomHorizontalFlip()] + normalise)
    evaluate = T.Compose([T.Resize(int(math.floor(img_size / 0.875))), T.CenterCrop(img_size)] + normalise)
    return train, evaluate


def loaders(args, splits, dist: Dist, mean, std):
    train_tf, eval_tf = transforms(args.img_size, mean, std)
    common = dict(num_workers=args.workers, persistent_workers=args.workers > 0)
    train_set = Images(splits.train, train_tf)
    # Seeded and reset per epoch with set_epoch: the same order whether a run was resumed or not.
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world, rank=dist.rank,
                                                  shuffle=True, seed=args.seed)
    per_rank = len(splits.train) // dist.world
    train = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                        drop_last=per_rank > args.batch_size, **common)
    evaluate = {name: torch.utils.data.DataLoader(Images(split, eval_tf), batch_size=args.batch_size, **common)
                for name, split in {"val": splits.val, **splits.tests}.items() if len(split)}
    return train, sampler, evaluate


# -- augmentation ------------------------------------------------------------------------


def build_augmentation(args, splits, run_dir, dist: Dist, mean, std):
    """The batch transform and, for generator strategies, the ring and generator pool."""
    from onlinemix import DiffMix, GeneratorPool, RandomResizedCropFlip, ReplaySource, SampleRing
    from onlinemix.pool import share_cpu_threads

    classes = len(splits.class_names)
    mix = dict(num_classes=classes, label_smoothing=args.smoothing, mean=mean, std=std,
               synthetic_transform=RandomResizedCropFlip(scale=TRAIN_CROP_SCALE, size=args.img_size))
    kind = "mixup" if args.aug == "mixup" else "cutmix" if args.aug in ("cutmix", "diffmix+cutmix") else None
    if kind is not None:
        mix[f"{kind}_alpha"] = getattr(args, f"{kind}_alpha")
        mix["prob"] = PAPER_MIXING[kind]["prob"] if args.mixup_prob is None else args.mixup_prob
        mix["mode"] = args.mixup_mode or PAPER_MIXING[kind]["mode"]
    if args.aug in ("none", "mixup", "cutmix"):
        return DiffMix(**mix, p=0.0), None, None
    if args.aug == "replay":
        source = ReplaySource(args.replay_dir, splits.class_names, size=args.img_size)
        return DiffMix(**mix, p=args.p, gamma=args.gamma, source=source), None, None
    ring = pool = error = None
    if dist.local_main:  # one ring and one generator pool per node, read by every local rank
        try:
            factory = generator_factory(args, splits, run_dir)
            workers = len(args.gen_device) * args.gen_workers_per_device
            ring = SampleRing.create(args.ring_slots, args.ring_size or args.img_size, producers=workers,
                                     consumers=dist.local_world, max_reuse=args.max_reuse)
            cpu_threads = share_cpu_threads(args.gen_device, args.gen_workers_per_device)
            pool = GeneratorPool(ring, factory, args.gen_device, workers_per_device=args.gen_workers_per_device,
                                 seed=args.seed, cpu_threads=cpu_threads)
        except (ValueError, FileNotFoundError) as failure:
            error = failure
    shared = dist.gather((ring.name if ring is not None else None, str(error) if error else None))
    if error is not None:
        raise error
    name, failure = shared[(dist.rank // dist.local_world) * dist.local_world]
    if failure:
        raise ValueError(f"local rank 0 could not set up the generator: {failure}")
    if ring is None:
        ring = SampleRing.attach(name, "consumer")
    return DiffMix(**mix, p=args.p, gamma=args.gamma, source=ring), ring, pool


def uses_personalisation(aug: str) -> bool:
    """Whether ``--aug`` runs a personalised generator (the real-* baselines run the base model)."""
    from onlinemix.plan import get_strategy

    return aug in STRATEGY_OF_AUG and get_strategy(STRATEGY_OF_AUG[aug]).personalised


def personalise_first(args, dist: Dist) -> None:
    """Make ``--gen-finetuned`` with ``onlinemix finetune`` unless it already holds a personalised
    generator; an interrupted run is resumed from its last checkpoint."""
    from onlinemix.finetune import latest_checkpoint
    from onlinemix.finetune import main as finetune
    from onlinemix.generator.components import PERSONALISATION_JSON

    if os.path.isfile(os.path.join(args.gen_finetuned, PERSONALISATION_JSON)):
        logger.info("using the personalised generator in %s", args.gen_finetuned)
        return
    if dist.world > 1:
        raise FileNotFoundError(
            f"{args.gen_finetuned!r} holds no personalised generator; make it before a multi-process run: "
            f"onlinemix finetune --config {args.gen_finetune_config} --out {args.gen_finetuned}")
    argv = ["--config", args.gen_finetune_config, "--out", args.gen_finetuned]
    if latest_checkpoint(args.gen_finetuned) is not None:
        argv.append("--resume")
    logger.info("personalising the generator first: onlinemix finetune %s", " ".join(argv))
    finetune(argv)


def generator_factory(args, splits, run_dir):
    from onlinemix.generator.worker import DiffMixProducer, GeneratorSpec

    model = args.gen_model
    if model == "tiny":
        from onlinemix.generator.components import tiny_components

        model = os.path.join(run_dir, "tiny-generator")
        if not os.path.isdir(model):
            tiny_components(seed=args.seed).save(model)
    weights = None
    if args.imbalance_factor:  # the paper: tail classes are translated toward more often
        from onlinemix.plan import long_tail_weights

        counts = np.bincount(splits.train.labels, minlength=len(splits.class_names))
        weights = tuple(long_tail_weights(counts).tolist())
    spec = GeneratorSpec(
        model=model, finetuned=args.gen_finetuned, strategy=STRATEGY_OF_AUG[args.aug], target_weights=weights,
        referable_classes=args.referable_classes,
        strengths=tuple(args.strengths) if args.strengths else None, steps=args.gen_steps, guidance=args.guidance,
        resolution=args.gen_resolution, image_size=args.ring_size or args.img_size, batch_size=args.gen_batch_size,
        dtype=args.gen_dtype, clip_model=args.clip_filter, local_files_only=args.local_files_only,
    )
    return DiffMixProducer(spec, splits.train, splits.class_names, args.metaclass)


# -- model and checkpoints ----------------------------------------------------------------


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


def save_atomic(state: dict, path: str) -> None:
    """Write a checkpoint to a temporary file, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# -- loop -----------------------------------------------------------------------------------


def evaluate(model, loader, device, num_classes, amp_dtype, train_counts=None, shot_thresholds=(20, 5)) -> dict:
    """Top-1 and top-5 over all images (micro, what papers and timm report), class-balanced top-1
    (``balanced_top1``, the mean of per-class accuracies) and per-class accuracy; many/medium/few
    with ``train_counts``; per-group and worst-group accuracy when the split defines groups."""
    from torchmetrics.classification import MulticlassAccuracy

    from onlinemix.data import shot_groups

    # Rank 0 evaluates on the whole split alone: no cross-rank sync.
    local = dict(num_classes=num_classes, sync_on_compute=False)
    top1 = MulticlassAccuracy(top_k=1, average="micro", **local).to(device)
    top5 = MulticlassAccuracy(top_k=min(5, num_classes), average="micro", **local).to(device)
    per_class = MulticlassAccuracy(average="none", **local).to(device)
    correct, seen = [], torch.zeros(num_classes, dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x).float()
            for metric in (top1, top5, per_class):
                metric.update(logits, y)
            correct.append((logits.argmax(1) == y).cpu())
            seen[y.cpu()] = True
    accuracy = per_class.compute().cpu()
    result = {"images": int(sum(len(c) for c in correct)), "top1": float(top1.compute()), "top5": float(top5.compute()),
              "balanced_top1": float(accuracy[seen].mean()), "per_class": [round(float(v), 4) for v in accuracy]}
    if train_counts is not None:
        many, few = shot_thresholds
        for group, classes in shot_groups(train_counts, many=many, few=few).items():
            classes = [c for c in classes if seen[c]]
            if classes:
                result[group] = float(accuracy[classes].mean())
    groups = loader.dataset.split.groups
    if groups is not None:
        result["groups"] = group_accuracy(torch.cat(correct).numpy(), groups)
        result["worst_group"] = min(result["groups"].values())
    return result


def group_accuracy(correct: np.ndarray, groups: list) -> dict:
    """Accuracy within each group; ``correct`` and ``groups`` in the loader's (unshuffled) order."""
    groups = np.asarray(groups)
    return {str(g): float(correct[groups == g].mean()) for g in sorted(set(groups.tolist()))}


def save_grid(mix, predictions, path: str) -> None:
    """The latest synthetic images with their top soft-label entries and, when known, the classifier's
    top-1 on each (``predictions``, aligned with ``mix.recent``)."""
    from PIL import Image, ImageDraw

    if mix.recent is None:
        return
    images, labels = mix.recent
    if predictions is None or len(predictions) != len(labels):
        predictions = [None] * len(labels)
    tiles = []
    for image, label, predicted in zip(images[:16], labels[:16], predictions[:16]):
        tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((96, 96))
        canvas = Image.new("RGB", (96, 124), "white")
        canvas.paste(tile, (0, 0))
        top = torch.topk(label, 2)
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 98), " ".join(f"{int(c)}:{float(v):.2f}" for v, c in zip(top.values, top.indices) if v > 0),
                  fill="black")
        if predicted is not None:
            draw.text((2, 110), f"called {int(predicted)}", fill="black")
        tiles.append(canvas)
    grid = Image.new("RGB", (96 * min(len(tiles), 8), 124 * math.ceil(len(tiles) / 8)), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % 8) * 96, (i // 8) * 124))
    grid.save(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist = init_distributed(args)
    logging.basicConfig(level=logging.INFO if dist.main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return train(args, dist)
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


def train(args, dist: Dist) -> dict:
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from tqdm import tqdm

    seed_everything(args.seed + dist.rank)  # each rank draws its own augmentations
    device = torch.device(args.device)
    run_dir = os.path.join(args.output, args.name or time.strftime("%Y%m%d-%H%M%S"))
    if dist.main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.yaml"), "w") as f:
            yaml.safe_dump(vars(args), f, sort_keys=True)
        splits = load_splits(args)  # writes the toy set once, before the other ranks read it
    dist.barrier()
    if not dist.main:
        splits = load_splits(args)
    num_classes = len(splits.class_names)
    train_counts = np.bincount(splits.train.labels, minlength=num_classes)
    model = build_model(args, num_classes).to(device)
    mean, std = normalisation(model)
    train_loader, sampler, eval_loaders = loaders(args, splits, dist, mean, std)
    if args.gen_finetune_config and uses_personalisation(args.aug):
        personalise_first(args, dist)
    mix, ring, pool = build_augmentation(args, splits, run_dir, dist, mean, std)
    fidelity = FidelityMonitor()

    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    warmup = args.warmup_epochs * args.epochs if args.warmup_epochs < 1 else args.warmup_epochs
    steps_per_epoch = len(train_loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch,
                                  warmup_t=int(warmup * steps_per_epoch), warmup_lr_init=args.lr * 0.01,
                                  t_in_epochs=False)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    loss_fn = SoftTargetCrossEntropy()

    start_epoch, best = 0, -1.0
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        if len(state["rng"]) == dist.world:
            set_rng_state(state["rng"][dist.rank])
        logger.info("resumed from %s at epoch %d", args.resume, start_epoch)
    forward = model
    if dist.world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        forward = torch.compile(forward)

    board = tensorboard(run_dir) if dist.main else None
    metrics_path, csv_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "metrics.csv")
    steps_path = os.path.join(run_dir, "steps.csv")
    result = {}
    try:
        if pool is not None:
            pool.start().warm_up(args.batch_size, timeout=args.gen_warmup)
        dist.barrier()
        for epoch in range(start_epoch, args.epochs):
            model.train()
            sampler.set_epoch(epoch)
            losses = []
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True,
                       disable=not dist.main)
            for step, (x, y) in enumerate(bar):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x, y = mix(x, y)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = forward(x)
                    loss = loss_fn(logits.float(), y)
                fidelity.update(logits, mix.synthetic)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step_update(epoch * steps_per_epoch + step + 1)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if dist.main and step % args.log_interval == 0:
                    log_step(steps_path, epoch, step, losses[-1], optimizer.param_groups[0]["lr"])
            augmentation = dist.gather(mix.stats())
            calls = FidelityMonitor.merge(dist.gather(fidelity.state()))
            fidelity.reset()
            evaluated = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
            if dist.main:
                result = epoch_report(args, epoch, losses, optimizer, augmentation, calls, ring, pool,
                                      eval_loaders if evaluated else {}, model, device, num_classes, amp_dtype,
                                      train_counts)
            # After evaluation, which draws from the RNG too: a resumed run starts where this one goes on.
            rng = dist.gather(rng_state())
            if dist.main:
                # Without a validation split the latest evaluated epoch is the best.
                score = result.get("val", {}).get("top1", -epoch) if evaluated else best
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                         "best": max(best, score), "rng": rng, "args": vars(args)}
                save_atomic(state, os.path.join(run_dir, "last.pth"))
                if evaluated and score > best:
                    best = score
                    save_atomic(state, os.path.join(run_dir, "best.pth"))
                save_grid(mix, fidelity.recent_predictions, os.path.join(run_dir, f"synthetic-epoch{epoch + 1:03d}.png"))
                write_metrics(result, metrics_path, csv_path)
                if board is not None:
                    for key, value in flat_scalars(result).items():
                        board.add_scalar(key, value, epoch + 1)
                    board.flush()
            dist.barrier()
    finally:
        if board is not None:
            board.close()
        if pool is not None:
            pool.stop()
        if ring is not None:
            ring.close()
    return result


def tensorboard(run_dir: str):
    """A TensorBoard writer in the run directory when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(run_dir)


def flat_scalars(result: dict, prefix: str = "") -> dict:
    """The numbers of a nested metrics dict, keyed like ``val/top1``."""
    scalars = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            scalars.update(flat_scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            scalars[name] = value
    return scalars


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
        called = f" (classifier calls it target {shares['target']:.2f}, source {shares['source']:.2f})"
    logger.info("epoch %d: loss %.4f, %s, synthetic %.3f%s", epoch + 1, result["train_loss"], accuracy,
                totals["replaced_fraction"], called)
    return result


def log_step(path: str, epoch: int, step: int, loss: float, lr: float) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["epoch", "step", "loss", "lr"])
        writer.writerow([epoch, step, f"{loss:.6f}", lr])


def write_metrics(result: dict, jsonl: str, csv_path: str) -> None:
    with open(jsonl, "a") as f:
        f.write(json.dumps(result) + "\n")
    row = {"epoch": result["epoch"], "train_loss": result["train_loss"], "lr": result["lr"],
           "synthetic_fraction": result["augmentation"]["replaced_fraction"]}
    if "fidelity" in result:
        row["synthetic_called_target"] = result["fidelity"]["all"]["target"]
        row["synthetic_called_source"] = result["fidelity"]["all"]["source"]
    for split, metrics in result.items():
        if isinstance(metrics, dict) and "top1" in metrics:
            row[f"{split}_top1"], row[f"{split}_top5"] = metrics["top1"], metrics["top5"]
            row[f"{split}_balanced_top1"] = metrics["balanced_top1"]
            if "worst_group" in metrics:
                row[f"{split}_worst_group"] = metrics["worst_group"]
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
