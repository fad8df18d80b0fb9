"""Data sets for training: ImageFolder splits, few-shot and long-tail subsets, a toy set.

Pure index arithmetic lives in free functions (``few_shot_indices``,
``long_tail_counts``, ``long_tail_indices``, ``validation_indices``);
``ImageFolderSplits`` reads a ``train/ [val/] [test/] [test_<name>/]`` tree and
``DatasetDictSplits`` a Hugging Face ``DatasetDict`` saved to disk;
``select_training_images`` applies a few-shot or long-tail subset and carves a
validation split from what the subset leaves out, all from one data seed, so the
generator and the classifier see the same training images whatever their training
seeds. ``onlinemix.data.toy`` and ``onlinemix.data.demo_world`` write generated data sets.

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
from PIL import Image

from .image_files import check_image_files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DATASETS = ("folder", "hf", "toy", "demo")


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


class SplitImages(torch.utils.data.Dataset):
    """A split as a torch ``Dataset`` of ``(transform(image), label)``; ``split`` stays reachable for
    its groups."""

    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        return self.transform(self.split.image(index)), self.split.labels[index]


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
        largest = int(np.bincount(labels).max())
        if shots >= largest:
            raise ValueError(f"--shots {shots} keeps every training image (no class has more than {largest}): "
                             f"that is no few-shot subset; pass fewer than {largest}, or leave --shots out.")
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
        empty = sorted(set(self.class_names) - {self.class_names[y] for y in self.train.labels})
        if empty:
            raise ValueError(f"{len(empty)} class folders of {train_dir!r} hold no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {empty[:3]}: a class needs training images; "
                             "fill or remove them.")
        val_dir = os.path.join(root, "val")
        self.val = self._read(val_dir) if os.path.isdir(val_dir) else None
        self.tests = {name: self._read(os.path.join(root, name)) for name in sorted(os.listdir(root))
                      if (name == "test" or name.startswith("test_")) and os.path.isdir(os.path.join(root, name))}

    def _read(self, folder: str) -> FileSplit:
        unknown = sorted(set(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
                         - set(self.class_names))
        if unknown:  # its images would be left out of the evaluation without a word
            raise ValueError(f"{folder!r} has class folders that train/ lacks: {unknown[:5]}; give every class "
                             "training images, or remove these folders.")
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


def check_data_options(data_dir, *, dataset: str = "folder", class_names: str | None = None,
                       shots: int | None = None, imbalance_factor: float | None = None, val_fraction: float = 0.1,
                       data_seed: int = 0) -> None:
    """Stop on data options that cannot work, before anything is read or written (``load_splits``'s arguments)."""
    if data_dir is None:
        raise ValueError("--data-dir is required (or --dataset toy --data-dir FOLDER to generate a toy set).")
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}.")
    if dataset not in ("toy", "demo") and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir!r} is not a folder; give one that holds "
                                "train/<class>/<images> (or a saved Hugging Face DatasetDict with --dataset hf).")
    if class_names and not os.path.isfile(class_names):
        raise FileNotFoundError(f"--class-names {class_names!r} is not a file; give one class name per line.")
    if shots is not None and shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}.")
    if imbalance_factor is not None and imbalance_factor < 1:
        raise ValueError(f"--imbalance-factor must be >= 1, got {imbalance_factor}.")
    if shots is not None and imbalance_factor is not None:
        raise ValueError("--shots and --imbalance-factor each choose a training subset; pass one of them.")
    if data_seed < 0:
        raise ValueError(f"--data-seed must be >= 0, got {data_seed}.")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must lie in [0, 1), got {val_fraction}.")


def load_splits(data_dir: str, *, dataset: str = "folder", class_names: str | None = None,
                shots: int | None = None, imbalance_factor: float | None = None, val_fraction: float = 0.1,
                data_seed: int = 0):
    """The splits of a run: the training subset and the validation carve drawn with ``data_seed``
    (``select_training_images``).

    Args:
        data_dir: The data set's folder.
        dataset: ``folder`` (``ImageFolderSplits``), ``hf`` (``DatasetDictSplits``), or ``toy`` /
            ``demo``: write the toy shapes / the demo world into ``data_dir`` first if it is
            missing, then read it as a folder.
        class_names: Text file with one class name per line, in label order.
        shots: Keep this many training images per class.
        imbalance_factor: The paper's long-tail subset with this factor.
        val_fraction: Validation share carved per class when the data set has no validation split.
        data_seed: Seed of the subset and the carve.
    """
    check_data_options(data_dir, dataset=dataset, class_names=class_names, shots=shots,
                       imbalance_factor=imbalance_factor, val_fraction=val_fraction, data_seed=data_seed)
    if not os.path.isdir(os.path.join(data_dir, "train")):
        if dataset == "toy":
            from .toy import write_toy_dataset

            write_toy_dataset(data_dir, seed=data_seed)
        elif dataset == "demo":
            from .demo_world import write_demo_world

            write_demo_world(data_dir)  # one world for every seed: seeds vary the training, not the data
    if dataset == "demo":
        from .demo_world import check_demo_world

        check_demo_world(data_dir)
    reader = DatasetDictSplits if dataset == "hf" else ImageFolderSplits
    splits = reader(data_dir)
    if class_names:
        splits.class_names = read_class_names(class_names, len(splits.class_names))
    splits.train, splits.val = select_training_images(
        splits.train, splits.val, shots=shots, imbalance_factor=imbalance_factor,
        val_fraction=val_fraction, seed=data_seed)
    for name, split in {"train": splits.train, "val": splits.val, **splits.tests}.items():
        if isinstance(split, FileSplit):  # a saved DatasetDict's images were decoded when it was made
            check_image_files(split.paths, f"{data_dir} ({name})")
    return splits


def read_class_names(path: str, count: int) -> list:
    """One class name per non-empty line; there must be ``count`` of them."""
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != count:
        raise ValueError(f"--class-names {path!r} lists {len(names)} names but the data set has {count} classes.")
    return names
