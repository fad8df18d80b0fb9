"""``onlinemix generate``: a synthetic set made offline on a Ray cluster, in the Diff-Mix layout, with a
manifest that regenerates it exactly.

This process, Ray's driver, plans ``--count`` samples with the strategy's planner seeded by
``--seed`` (the draws a generator worker makes online), cuts them into tasks of
``--gen-batch-size`` and writes the plan to ``OUT/manifest.json``: each sample's number,
task, reference image (by id), source and target class, strength, seed and guidance scale
(and an inverted strategy's partner and weight). A Ray Data pipeline maps the tasks over
``--workers`` actors of ``--gpus`` GPUs each (``map_batches`` on an actor pool): each actor
loads the generator once, renders each task as one batch (``DiffusionProducer.render``) and
writes its images to ``OUT/data/<source>/<target>-<number>-<strength>.png`` with a
``meta.csv`` row each (``SampleRecorder``: the layout of the official sampler, which
``train.py --aug replay --replay-dir OUT`` reads). ``--regenerate SET`` renders a manifest's
tasks again: the same images, bit for bit, on the same software and kind of device (and, on CPU actors,
the same threads per actor: Ray gives each its CPU count). So that an actor renders each task as if it
were alone, the VAE posterior cache is off here (``--gen-posterior-cache`` is ignored).

    onlinemix generate --data-dir data/cub --metaclass bird --aug diffmix --gen-model MODEL \\
        --gen-finetuned runs/cub-ti-db --count 20000 --out runs/cub-diffmix --cluster auto --workers 8
    onlinemix generate --regenerate runs/cub-diffmix --out /tmp/cub-diffmix-again
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

import numpy as np
import torch

from .augmentation import augmentation_name
from .batch import SampleBatch
from .cluster import check_gpus, check_reachable, import_ray
from .data import check_data_options, load_splits
from .options import (HelpFormatter, add_data_arguments, add_generator_arguments, check_generator_args,
                      data_options, generator_factory, parse_with_config)
from .plan import STRATEGIES, Request
from .sources import SampleRecorder

FORMAT = "onlinemix-generate/2"
# Format 1 held an inverted strategy's interpolation weight as the reference condition's; 2 holds the partner's.
FORMAT_1 = "onlinemix-generate/1"
# Where and how a set is made, not what it holds: a regeneration may change them.
PLACEMENT = ("out", "regenerate", "cluster", "workers", "gpus", "config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onlinemix generate", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML file of defaults; flags given here override it")
    add_data_arguments(p.add_argument_group("data"))
    what = p.add_argument_group("what to generate")
    what.add_argument("--aug", type=augmentation_name, choices=tuple(STRATEGIES), default="diffmix",
                      help="the strategy; the paper's spellings (diff-mix ...) work too")
    what.add_argument("--count", type=int, help="samples to plan (non-finite ones are not written)")
    what.add_argument("--image-size", type=int, help="side of the written images (default --gen-resolution)")
    what.add_argument("--seed", type=int, default=0, help="seed of the plan: pairs, strengths, noise seeds")
    add_generator_arguments(p.add_argument_group("generator"))
    where = p.add_argument_group("where")
    where.add_argument("--out", help="a new or empty folder for the set")
    where.add_argument("--regenerate", metavar="SET", help="render SET's manifest again into --out, with its settings")
    where.add_argument("--cluster", default="local",
                       help="the Ray cluster: 'auto' (the one `ray start` joined this machine to), HOST:PORT, "
                            "ray://HOST:PORT, or 'local' (a Ray instance on this machine)")
    where.add_argument("--workers", type=int, default=1, help="generator actors")
    where.add_argument("--gpus", type=float, default=1.0, help="GPUs per actor (0: CPU actors)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options; with ``--regenerate``, the manifest's settings and this command's placement."""
    parser = build_parser()
    args = parse_with_config(parser, argv)
    if args.regenerate:
        given = sorted(k for k, v in vars(args).items() if k not in PLACEMENT and v != parser.get_default(k))
        if given:
            raise ValueError(f"--regenerate takes every setting from the manifest; pass only --out, --cluster, "
                             f"--workers and --gpus (got {', '.join('--' + k.replace('_', '-') for k in given)}).")
        recorded = read_manifest(args.regenerate)["options"]
        args = argparse.Namespace(**{**recorded, **{k: getattr(args, k) for k in PLACEMENT}})
    check_args(args)
    # A task's bits must not depend on the tasks its actor rendered before (a regeneration deals them out
    # again): with cached posteriors a task encodes only its uncached references, in a smaller batch, and a
    # convolution need not give an image the same bits in batches of different sizes.
    args.gen_posterior_cache = 0
    return args


def check_args(args: argparse.Namespace) -> None:
    """Stop before any work on settings that cannot run."""
    if not args.out:
        raise ValueError("--out (a new or empty folder for the set) is required.")
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out!r} is not empty; pass a new or empty folder.")
    if not args.regenerate and (args.count is None or args.count < 1):
        raise ValueError("--count (how many samples to plan) must be >= 1.")
    if args.workers < 1 or args.gpus < 0:
        raise ValueError(f"--workers must be >= 1 and --gpus >= 0, got {args.workers} and {args.gpus}.")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}.")
    if args.gen_model == "tiny":
        raise ValueError("--gen-model tiny is an untrained model made afresh for training smoke runs; a set needs a "
                         "saved model: a folder or hub id.")
    if args.clip_filter:
        raise ValueError("--clip-filter drops samples while training (train.py); onlinemix generate writes every "
                         "sample, so filter when you train on the set.")
    check_data_options(args.data_dir, **data_options(args))
    check_generator_args(args)
    import_ray()
    check_reachable(args.cluster)


def read_manifest(folder: str) -> dict:
    """A set's manifest, checked for what ``--regenerate`` needs."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No manifest.json in {folder!r}: pass a folder `onlinemix generate` wrote.")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") == FORMAT_1:  # the same set, its weights said the other way round
        for sample in manifest["samples"]:
            sample["alpha"] = 1 - sample["alpha"] if sample["partner"] is not None else 0.0
        manifest["format"] = FORMAT
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an onlinemix generate manifest ({FORMAT}); it says "
                         f"{manifest.get('format')!r}.")
    return manifest


def write_manifest(folder: str, manifest: dict) -> None:
    """Atomically: a stopped job leaves the previous version, never half a file."""
    path = os.path.join(folder, "manifest.json")
    with open(f"{path}.partial", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(f"{path}.partial", path)


def planned_samples(planner, *, count: int, seed: int, batch_size: int, ids: list, recorder: SampleRecorder) -> list:
    """The manifest's rows: ``count`` requests of ``planner`` seeded with ``seed``, ``batch_size`` per task."""
    rows = []
    for number, request in enumerate(planner.reseeded(seed).take(count)):
        row = asdict(request)
        row.update(number=number, task=number // batch_size,
                   reference=ids[request.reference] if request.reference >= 0 else None,
                   partner=ids[request.partner] if request.partner >= 0 else None,
                   path=recorder.path_of(request.source, request.target, number, request.strength))
        rows.append(row)
    return rows


def task_requests(samples: list, ids: list) -> list:
    """``[{"task", "requests"}]``: each task's requests as JSON, references as indices into ``ids``."""
    index = {image_id: i for i, image_id in enumerate(ids)}
    missing = sorted({s[k] for s in samples for k in ("reference", "partner") if s[k] is not None} - set(index))
    if missing:
        raise ValueError(f"The manifest refers to {len(missing)} training images this data set lacks, e.g. "
                         f"{missing[:3]}; pass the data options the set was made with.")
    tasks: dict = {}
    for s in samples:
        request = {k: s[k] for k in ("source", "target", "strength", "seed", "alpha", "guidance")}
        request.update(number=s["number"], reference=index.get(s["reference"], -1),
                       partner=index.get(s["partner"], -1))
        tasks.setdefault(s["task"], []).append(request)
    return [{"task": task, "requests": json.dumps(requests)} for task, requests in sorted(tasks.items())]


class TaskRenderer:
    """A Ray Data actor: loads the generator once, renders each task as one batch and writes its images.

    Args:
        factory: The ``DiffusionProducerFactory``.
        recorder: Writes the images and their ``meta.csv`` rows (several actors may write at once).
        device: ``"cuda"`` on an actor with a GPU, else ``"cpu"``.
    """

    def __init__(self, factory, recorder: SampleRecorder, device: str):
        self.producer, self.recorder = factory(device), recorder

    def __call__(self, batch: dict) -> dict:
        numbers, finite = [], []
        for text in batch["requests"]:
            rows = json.loads(text)
            requests = [Request(**{k: v for k, v in row.items() if k != "number"}) for row in rows]
            images, ok = self.producer.render(requests)
            for k, (row, request) in enumerate(zip(rows, requests)):
                if ok[k]:
                    self.recorder.write(SampleBatch(images[k:k + 1], torch.tensor([request.source]),
                                                    torch.tensor([request.target]),
                                                    torch.tensor([request.strength], dtype=torch.float32)),
                                        first_number=row["number"])
            numbers += [row["number"] for row in rows]
            finite += ok.tolist()
        return {"number": np.array(numbers, dtype=np.int64), "finite": np.array(finite, dtype=bool)}


def main(argv=None) -> dict:
    """``onlinemix generate``: returns the set's facts."""
    return generate(parse_args(argv))


def generate(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    ray = import_ray()
    splits = load_splits(args.data_dir, **data_options(args))
    ids = [str(i) for i in splits.train.image_ids()]
    factory = generator_factory(args, splits, args.out, image_size=args.image_size or args.gen_resolution)
    recorder = SampleRecorder(args.out, splits.class_names)
    if args.regenerate:
        source = read_manifest(args.regenerate)
        if source["data"]["fingerprint"] != splits.train.fingerprint():
            raise ValueError(f"The training images differ from those {args.regenerate!r} was made from (their "
                             "fingerprints differ); pass the same data folder and data options.")
        samples = [{k: v for k, v in s.items() if k != "written"} for s in source["samples"]]
    else:
        samples = planned_samples(factory.planner, count=args.count, seed=args.seed, batch_size=args.gen_batch_size,
                                  ids=ids, recorder=recorder)
    tasks = task_requests(samples, ids)
    options = {k: v for k, v in vars(args).items() if k not in PLACEMENT}
    manifest = {"format": FORMAT, "options": options, "class_names": list(splits.class_names),
                "data": {"fingerprint": splits.train.fingerprint()}, "software": software(),
                "placement": {k: getattr(args, k) for k in ("cluster", "workers", "gpus")}, "finished": False,
                "samples": samples}
    write_manifest(args.out, manifest)
    if not ray.is_initialized():
        ray.init(address=None if args.cluster == "local" else args.cluster, include_dashboard=False,
                 log_to_driver=False)
    check_gpus(ray, args.workers, args.gpus, hint="--gpus 0 runs CPU actors")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    rendered = ray.data.from_items(tasks).map_batches(
        TaskRenderer, fn_constructor_kwargs=dict(factory=factory, recorder=recorder,
                                                 device="cuda" if args.gpus > 0 else "cpu"),
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=args.workers),
        num_gpus=args.gpus, num_cpus=1)
    finite: dict = {}
    with tqdm(total=len(samples), desc="generating", unit="image") as bar:
        for row in rendered.iter_rows():
            finite[int(row["number"])] = bool(row["finite"])
            bar.update(1)
    for sample in samples:
        sample["written"] = finite[sample["number"]]
    manifest["finished"] = True
    write_manifest(args.out, manifest)
    written = sum(finite.values())
    print(f"wrote {written} images ({len(samples) - written} non-finite left out) to {args.out}", flush=True)
    return {"out": args.out, "samples": len(samples), "written": written, "tasks": len(tasks)}


def software() -> dict:
    """Versions that decide the bits of a regeneration (with the kind of device the actors ran on)."""
    import diffusers

    from . import __version__

    return {"onlinemix": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
