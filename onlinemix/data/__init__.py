"""Data sets for training: ImageFolder splits, few-shot and long-tail subsets, a toy set.

Pure index arithmetic lives in free functions (``few_shot_indices``,
``long_tail_counts``, ``long_tail_indices``, ``validation_indices``, ``shot_groups``);
``ImageFolderSplits`` reads a ``train/ [val/] [test/] [test_<name>/]`` tree and
``DatasetDictSplits`` a Hugging Face ``DatasetDict`` saved to disk;
``select_training_images`` applies a few-shot or long-tail subset and carves a
validation split from what the subset leaves out, all from one data seed, so the
generator and the classifier see the same training images whatever their training
seeds; ``write_toy_dataset`` writes a small generated data set for tests and for
trying the trainer without a download.

A split may define groups (e.g. background × class family, as Waterbirds does) for
per-group and worst-group accuracy: a ``groups.csv`` (``file,group``) in an
ImageFolder split, or a ``group`` column in a Hugging Face split.
"""
from __future__ import annotations

import csv
import hashlib
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def few_shot_indices(labels: Sequence[int], shots: int, seed: int = 0) -> np.ndarray:
    """``shots`` images per class, drawn once with ``seed`` (all of a class that has fewer)."""
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def long_tail_counts(class_sizes: Sequence[int], imbalance_factor: float) -> np.ndarray:
    """Images each class keeps in the long-tail subsets of Diff-Mix (CUB-LT, Flower-LT).

    The official construction (after CMO): with ``n̄`` the mean class size and the
    classes sorted by size, largest first (ties by class index), the class at sorted
    position ``k`` keeps ``max(int(n̄·(1/ρ)^(k/(N-2))), 1)`` images, never more than it
    has. The paper's Eq. 4 writes ``k/(N-1)``; the code's ``N - 2`` is what gives its
    Table 10 sizes (CUB-LT 1242 and 2238 images at ρ = 100 and 10).

    Args:
        class_sizes: Training images per class, in class order.
        imbalance_factor: ``ρ >= 1``.

    Returns:
        int64 ``[N]``: images kept per class, in class order.
    """
    if imbalance_factor < 1:
        raise ValueError(f"--imbalance-factor must be >= 1, got {imbalance_factor}.")
    sizes = np.asarray(class_sizes, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    mean = sizes.sum() / len(sizes)
    position = np.arange(len(sizes))
    kept = np.maximum((mean * (1.0 / imbalance_factor) ** (position / max(len(sizes) - 2, 1))).astype(np.int64), 1)
    counts = np.empty_like(sizes)
    counts[order] = np.minimum(kept, sizes[order])
    return counts


def long_tail_indices(labels: Sequence[int], imbalance_factor: float, seed: int = 0) -> np.ndarray:
    """A seeded long-tail subset: class ``c`` keeps ``long_tail_counts(...)[c]`` of its images."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = long_tail_counts([np.sum(labels == c) for c in classes], imbalance_factor)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, counts)]
    return np.sort(np.concatenate(picked))


def validation_indices(labels: Sequence[int], fraction: float, seed: int = 0,
                       exclude: Sequence[int] | None = None) -> np.ndarray:
    """A seeded ``round(fraction·n_c)`` images of each class ``c`` (none of a one-image class),
    drawn from the images not in ``exclude`` (at most all of them)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    taken = np.zeros(len(labels), dtype=bool)
    if exclude is not None:
        taken[np.asarray(exclude, dtype=np.int64)] = True
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = int(round(fraction * len(members))) if len(members) > 1 else 0
        val.extend(rng.permutation(members[~taken[members]])[:take].tolist())
    return np.sort(np.asarray(val, dtype=np.int64))


def shot_groups(train_counts: Sequence[int], many: int = 20, few: int = 5) -> dict[str, np.ndarray]:
    """Classes by training images: many (> ``many``), medium, few (< ``few``); the defaults are
    CUB-LT's thresholds, Flower-LT's are 30 and 10."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts > many),
        "medium": np.flatnonzero((counts <= many) & (counts >= few)),
        "few": np.flatnonzero(counts < few),
    }


class Split:
    """One split: ``labels`` plus images by index, as PIL (``image``) or uint8 ``[3, H, W]`` (``load``).

    ``load`` makes a split usable as the generator's reference images. ``groups`` holds
    one group name per image where the data set defines groups, else None.
    """

    labels: list
    groups: list | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def load(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.image(index)).copy()).permute(2, 0, 1)

    def subset(self, indices) -> "Split":
        raise NotImplementedError

    def image_ids(self) -> list:
        """A name per image that survives moving the data set (``<class folder>/<file>``, a row number)."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """``{"count", "sha256"}`` of the images and their labels, order aside: two splits with the same
        fingerprint hold the same images. Personalised generators record it (``onlinemix.json``)."""
        rows = sorted(f"{name}\t{label}" for name, label in zip(self.image_ids(), self.labels))
        return {"count": len(rows), "sha256": hashlib.sha256("\n".join(rows).encode()).hexdigest()}


class FileSplit(Split):
    """Images as files on disk."""

    def __init__(self, paths: list, labels: list, groups: list | None = None):
        self.paths, self.labels = list(paths), [int(y) for y in labels]
        self.groups = None if groups is None else [str(g) for g in groups]

    def image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")

    def subset(self, indices) -> "FileSplit":
        groups = None if self.groups is None else [self.groups[i] for i in indices]
        return FileSplit([self.paths[i] for i in indices], [self.labels[i] for i in indices], groups)

    def image_ids(self) -> list:
        return ["/".join(os.path.normpath(p).split(os.sep)[-2:]) for p in self.paths]


class DatasetSplit(Split):
    """Rows of a Hugging Face ``datasets.Dataset`` with an image and a class-label column."""

    def __init__(self, dataset, image_column: str, label_column: str, rows=None):
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.rows = list(range(len(dataset))) if rows is None else [int(r) for r in rows]
        labels = dataset[label_column]
        self.labels = [int(labels[r]) for r in self.rows]
        if "group" in dataset.column_names:
            names = dataset.features["group"].names if hasattr(dataset.features["group"], "names") else None
            groups = dataset["group"]
            self.groups = [str(names[groups[r]] if names else groups[r]) for r in self.rows]

    def image(self, index: int) -> Image.Image:
        return self.dataset[self.rows[index]][self.image_column].convert("RGB")

    def subset(self, indices) -> "DatasetSplit":
        return DatasetSplit(self.dataset, self.image_column, self.label_column, [self.rows[i] for i in indices])

    def image_ids(self) -> list:
        return [f"row {r}" for r in self.rows]


def select_training_images(train: Split, val: Split | None, *, shots: int | None = None,
                           imbalance_factor: float | None = None, val_fraction: float = 0.1,
                           seed: int = 0) -> tuple[Split, Split]:
    """The training images and the validation split of a run.

    A few-shot (``shots``) or long-tail (``imbalance_factor``) subset is drawn from all
    training images; without a validation split of its own, validation then takes
    ``round(val_fraction·n_c)`` images of each class from the ones the subset leaves
    out, so the subset keeps its sizes (without a subset, from all training images).
    Everything is drawn from ``seed`` (``--data-seed``), never the training seed.
    """
    if shots is not None and imbalance_factor is not None:
        raise ValueError("--shots and --imbalance-factor each choose a training subset; pass one of them.")
    labels = np.asarray(train.labels)
    keep = None
    if shots is not None:
        keep = few_shot_indices(labels, shots, seed=seed)
    elif imbalance_factor is not None:
        keep = long_tail_indices(labels, imbalance_factor, seed=seed)
    if val is None:
        carved = validation_indices(labels, val_fraction, seed=seed, exclude=keep)
        val = train.subset(carved.tolist())
        if keep is None:
            keep = np.setdiff1d(np.arange(len(labels)), carved)
    return (train if keep is None else train.subset(keep.tolist())), val


def read_groups(folder: str, paths: list) -> list | None:
    """The group of each image from ``folder/groups.csv`` (``file,group``), or None without that file."""
    table = os.path.join(folder, "groups.csv")
    if not os.path.exists(table):
        return None
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"file", "group"} <= set(rows[0]):
        raise ValueError(f"{table!r} needs the columns file,group; it has {','.join(rows[0])}.")
    groups = {os.path.normpath(os.path.join(folder, row["file"])): row["group"] for row in rows}
    missing = [p for p in paths if os.path.normpath(p) not in groups]
    if missing:
        raise ValueError(f"{table!r} has no group for {len(missing)} image(s), e.g. "
                         f"{os.path.relpath(missing[0], folder)!r}: give every image of the split a row.")
    return [groups[os.path.normpath(p)] for p in paths]


class ImageFolderSplits:
    """``root/train/<class>/*.png`` (+ ``val/``, ``test/``, ``test_<name>/``), classes sorted by folder name.

    ``val`` is None without ``val/`` (``select_training_images`` carves one). ``tests`` maps
    ``test`` and every ``test_<name>`` folder (e.g. a counterfactual test set) to its split.
    A split folder may hold ``groups.csv`` with a ``file,group`` row per image, ``file``
    relative to the split folder (``<class>/<image>``).
    """

    def __init__(self, root: str):
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(
                f"No training folder at {train_dir!r}: --data-dir must hold train/<class>/<images> "
                "(and optionally val/ and test/).")
        self.class_names = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
        if len(self.class_names) < 2:
            raise ValueError(f"{train_dir!r} holds {len(self.class_names)} class folders; a classifier needs >= 2.")
        self.train = self._read(train_dir)
        if not len(self.train):
            raise ValueError(f"{train_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        val_dir = os.path.join(root, "val")
        self.val = self._read(val_dir) if os.path.isdir(val_dir) else None
        self.tests = {name: self._read(os.path.join(root, name)) for name in sorted(os.listdir(root))
                      if (name == "test" or name.startswith("test_")) and os.path.isdir(os.path.join(root, name))}

    def _read(self, folder: str) -> FileSplit:
        paths, labels = [], []
        for label, name in enumerate(self.class_names):
            class_dir = os.path.join(folder, name)
            if not os.path.isdir(class_dir):
                continue
            for file in sorted(os.listdir(class_dir)):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(class_dir, file))
                    labels.append(label)
        return FileSplit(paths, labels, read_groups(folder, paths))


class DatasetDictSplits:
    """A Hugging Face ``DatasetDict`` saved with ``save_to_disk``: splits ``train`` and
    optionally ``validation`` (or ``val``) and ``test``, an ``Image`` column and a
    ``ClassLabel`` column, whose names become the class names. ``val`` is None without a
    validation split. Needs ``datasets``."""

    def __init__(self, root: str):
        try:
            import datasets
        except ImportError:
            raise ValueError("--dataset hf needs the datasets package: pip install datasets.") from None
        if not os.path.isdir(root):
            raise FileNotFoundError(f"No saved Hugging Face data set at {root!r}.")
        loaded = datasets.load_from_disk(root)
        if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
            raise ValueError(f"{root!r} must be a DatasetDict with a 'train' split "
                             "(save_to_disk of load_dataset(...)).")
        features = loaded["train"].features
        images = [n for n, f in features.items() if isinstance(f, datasets.Image)]
        labels = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if not images or not labels:
            raise ValueError(f"{root!r} needs an Image column and a ClassLabel column; it has {dict(features)}.")
        self.class_names = list(features[labels[0]].names)

        def split(name):
            return DatasetSplit(loaded[name], images[0], labels[0]) if name in loaded else None

        self.train = split("train")
        self.val = split("validation") or split("val")
        self.tests = {name: split(name) for name in sorted(loaded) if name == "test" or name.startswith("test_")}


def add_data_arguments(parser) -> None:
    """The data set options ``train.py`` and ``onlinemix finetune`` share, on ``parser`` (or a group)."""
    parser.add_argument("--data-dir", help="ImageFolder root with train/ (val/, test/, test_<name>/ optional)")
    parser.add_argument("--dataset", choices=["folder", "hf", "toy", "demo"], default="folder",
                        help="folder: train/<class>/ images; hf: a Hugging Face DatasetDict saved with save_to_disk; "
                             "toy / demo: write the toy shapes / the demo world of birds (onlinemix.data.demo_world) "
                             "into --data-dir first if it is missing, then read it as a folder")
    parser.add_argument("--class-names", help="text file with one class name per line, in label order "
                                              "(default: the folder or ClassLabel names)")
    parser.add_argument("--metaclass", default="object", help='what the classes are, for prompts ("bird" ...)')
    parser.add_argument("--shots", type=int, help="keep K training images per class (drawn with --data-seed)")
    parser.add_argument("--imbalance-factor", type=float,
                        help="the paper's long-tail subset with this factor (drawn with --data-seed)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="validation share of each class carved when there is no val/, from the training "
                             "images a --shots or --imbalance-factor subset leaves out")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the subset and the validation carve; keep it equal for the personalised "
                             "generator and the classifier, whatever their --seed")


def check_data_arguments(args) -> None:
    """Stop on data options that cannot work, before anything is read or written."""
    if args.data_dir is None:
        raise ValueError("--data-dir is required (or --dataset toy --data-dir FOLDER to generate a toy set).")
    if args.dataset not in ("toy", "demo") and not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data-dir {args.data_dir!r} is not a folder; give one that holds "
                                "train/<class>/<images> (or a saved Hugging Face DatasetDict with --dataset hf).")
    if args.class_names and not os.path.isfile(args.class_names):
        raise FileNotFoundError(f"--class-names {args.class_names!r} is not a file; give one class name per line.")
    if args.shots is not None and args.shots < 1:
        raise ValueError(f"--shots must be >= 1, got {args.shots}.")
    if args.imbalance_factor is not None and args.imbalance_factor < 1:
        raise ValueError(f"--imbalance-factor must be >= 1, got {args.imbalance_factor}.")
    if args.shots is not None and args.imbalance_factor is not None:
        raise ValueError("--shots and --imbalance-factor each choose a training subset; pass one of them.")
    if args.data_seed < 0:
        raise ValueError(f"--data-seed must be >= 0, got {args.data_seed}.")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must lie in [0, 1), got {args.val_fraction}.")


def load_splits(args):
    """The splits named by the options of ``add_data_arguments``: the training subset and the
    validation carve drawn with ``args.data_seed`` (``select_training_images``), ``--class-names`` read."""
    check_data_arguments(args)
    if not os.path.isdir(os.path.join(args.data_dir, "train")):
        if args.dataset == "toy":
            write_toy_dataset(args.data_dir, seed=args.data_seed)
        elif args.dataset == "demo":
            from .demo_world import write_demo_world

            write_demo_world(args.data_dir)  # one world for every seed: seeds vary the training, not the data
    if args.dataset == "demo":
        from .demo_world import check_demo_world

        check_demo_world(args.data_dir)
    reader = DatasetDictSplits if args.dataset == "hf" else ImageFolderSplits
    splits = reader(args.data_dir)
    if args.class_names:
        splits.class_names = read_class_names(args.class_names, len(splits.class_names))
    splits.train, splits.val = select_training_images(
        splits.train, splits.val, shots=args.shots, imbalance_factor=args.imbalance_factor,
        val_fraction=args.val_fraction, seed=args.data_seed)
    return splits


def read_class_names(path: str, count: int) -> list:
    """One class name per non-empty line; there must be ``count`` of them."""
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != count:
        raise ValueError(f"--class-names {path!r} lists {len(names)} names but the data set has {count} classes.")
    return names


TOY_COLOURS = [(200, 40, 40), (40, 160, 60), (50, 80, 200), (220, 180, 30), (160, 60, 180), (30, 170, 170)]


def write_toy_dataset(root: str, *, classes: int = 6, train_per_class: int = 30, val_per_class: int = 8,
                      test_per_class: int = 12, size: int = 32, seed: int = 0) -> None:
    """A small ImageFolder data set of coloured shapes on textured backgrounds.

    Class ``c`` is a shape (disc, square, triangle, bar ...) in colour ``c``, placed
    at a random position and scale on a random two-tone background. For tests and
    for trying the trainer without downloading anything.
    """
    if classes > len(TOY_COLOURS):
        raise ValueError(f"The toy data set has at most {len(TOY_COLOURS)} classes.")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                _toy_image(c, size, rng).save(os.path.join(folder, f"{i:04d}.png"))


def _toy_image(c: int, size: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 120, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    stripe = tuple(int(v) for v in rng.integers(0, 120, 3))
    for y in range(0, size, int(rng.integers(3, 8))):
        draw.line([(0, y), (size, y)], fill=stripe)
    r = int(size * rng.uniform(0.2, 0.35))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = [cx - r, cy - r, cx + r, cy + r]
    colour = TOY_COLOURS[c]
    shape = c % 4
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    elif shape == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=colour)
    return image
