"""Where synthetic samples come from: sources that implement ``onlinemix.batch.SampleSource``.

A source hands out translated images with the metadata needed to label them:
the reference image's class (``source``), the prompt's class (``target``) and
the SDEdit strength. Labels are *not* stored: ``DiffMix`` computes them when a
sample is read, so γ and smoothing can change without regenerating anything.

- ``TensorSource``: a pool held in memory (tests, or a precomputed pool).
- ``ReplaySource``: a directory written by the original, offline Diff-Mix sampler.
- ``SampleRing`` (``onlinemix.ring``): fresh samples from a live generator process.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from .batch import SampleBatch
from .data.image_files import check_image_files

Size = Union[int, Sequence[int]]


def first_reads(read: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """bool ``[K]``: which draws of ``index`` read their sample for the first time in this process (a
    sample drawn twice in one take is read first once); marks them all read in ``read``."""
    once = np.zeros(len(index), dtype=bool)
    once[np.unique(index, return_index=True)[1]] = True
    first = once & ~read[index]
    read[index] = True
    return torch.from_numpy(first)


class TensorSource:
    """A pool of synthetic samples held in memory, drawn uniformly with replacement; each sample's first
    draw in this process is marked ``first_read``.

    Args:
        images: uint8 ``[N, 3, H, W]``.
        source: int64 ``[N]``, reference classes.
        target: int64 ``[N]``, prompt classes.
        strength: float ``[N]``, SDEdit strengths in ``[0, 1]``.
    """

    def __init__(self, images: torch.Tensor, source: torch.Tensor, target: torch.Tensor, strength: torch.Tensor):
        pool = SampleBatch(images, source.long(), target.long(), strength.float())
        if len(pool) == 0:
            raise ValueError("TensorSource needs at least one sample, got an empty pool.")
        self.pool = pool
        self.read = np.zeros(len(pool), dtype=bool)

    def __len__(self) -> int:
        return len(self.pool)

    def take(self, n: int) -> SampleBatch:
        index = np.random.randint(0, len(self.pool), size=n)
        batch = self.pool.select(torch.from_numpy(index))
        return dataclasses.replace(batch, first_read=first_reads(self.read, index))


def _folder_name(name: str) -> str:
    # How the offline sampler names class folders and files.
    return name.replace(" ", "_").replace("/", "_")


def _class_key(name: str) -> str:
    # The offline sampler turns ' ' and '/' into '_' in folder and file names and
    # writes meta.csv with '_' turned back into ' ': compare names in that form.
    return name.replace("/", " ").replace("_", " ")


def _pixel_size(size: Size) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}.")
    return int(height), int(width)


class ReplaySource:
    """Serves a directory written by the original (offline) Diff-Mix sampler.

    The layout is the one ``scripts/sample_mp.py`` of the Diff-Mix repository
    writes: ``root/meta.csv`` with columns ``First Directory`` (reference class),
    ``Second Directory`` (prompt class), ``Number``, ``Strength`` and ``Path``,
    and images at ``root/data/<Path>``. Images are decoded only when taken and
    resized (bicubic, with antialiasing) to ``size``; each image's first draw in
    this process is marked ``first_read``.

    Args:
        root: Directory holding ``meta.csv`` and ``data/``.
        class_names: Class names of the training set, in label order. Names are
            matched the way the sampler writes them (``_`` and ``/`` read as spaces).
        size: Output size, ``int`` for square or ``(height, width)``.
    """

    COLUMNS = ("First Directory", "Second Directory", "Strength", "Path")

    def __init__(self, root: Union[str, os.PathLike], class_names: Sequence[str], *, size: Size):
        self.root = os.fspath(root)
        self.size = _pixel_size(size)
        meta = os.path.join(self.root, "meta.csv")
        if not os.path.isfile(meta):
            raise FileNotFoundError(
                f"No meta.csv in {self.root!r}: pass the output directory of the Diff-Mix "
                "sampler, the one that holds meta.csv and data/."
            )
        class_index = self._class_index(class_names)
        paths, source, target, strength = [], [], [], []
        with open(meta, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in self.COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{meta} lacks the columns {missing}; it has {reader.fieldnames}.")
            unknown = set()
            for line, row in enumerate(reader, start=2):
                s, t = (class_index.get(_class_key(row[c])) for c in self.COLUMNS[:2])
                unknown.update(row[c] for c, i in zip(self.COLUMNS[:2], (s, t)) if i is None)
                strength.append(self._strength(row["Strength"], meta, line))
                paths.append(self._image_path(row["Path"], meta, line))
                source.append(s)
                target.append(t)
        if unknown:
            raise ValueError(
                f"{meta} names {len(unknown)} classes that are not in class_names, e.g. "
                f"{sorted(unknown)[:5]}; pass the training set's class names in label order "
                f"(got {len(class_names)} names starting {list(class_names)[:3]})."
            )
        if not paths:
            raise ValueError(f"{meta} lists no images.")
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} of the {len(paths)} images listed in {meta} are missing, e.g. "
                f"{absent[:3]}; regenerate them or remove their rows."
            )
        check_image_files(paths, meta)  # now, not when a damaged one is drawn epochs into training
        self.paths = paths
        self.source = torch.tensor(source, dtype=torch.int64)
        self.target = torch.tensor(target, dtype=torch.int64)
        self.strength = torch.tensor(strength, dtype=torch.float32)
        self.read = np.zeros(len(paths), dtype=bool)

    @staticmethod
    def _class_index(class_names: Sequence[str]) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, name in enumerate(class_names):
            key = _class_key(name)
            if key in index:
                raise ValueError(
                    f"Class names {class_names[index[key]]!r} and {name!r} are the same once "
                    "'_' and '/' are read as spaces, as the Diff-Mix sampler writes them; "
                    "the replay directory cannot tell them apart."
                )
            index[key] = i
        return index

    @staticmethod
    def _strength(text: str, meta: str, line: int) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{meta} line {line}: Strength must be a number in [0, 1], got {text!r}.")
        return value

    def _image_path(self, path: str, meta: str, line: int) -> str:
        # A listed path stays inside data/ or is refused: '../' or an absolute path would read other files,
        # the test set's among them. (Links inside data/ are the folder's own choice and are followed.)
        data = os.path.abspath(os.path.join(self.root, "data"))
        resolved = os.path.normpath(os.path.join(data, path))
        if os.path.commonpath([data, resolved]) != data or resolved == data:
            raise ValueError(f"{meta}, line {line}: Path {path!r} points outside {data}; a replay folder lists "
                             "only its own images, as paths inside data/.")
        return resolved

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: str) -> torch.Tensor:
        height, width = self.size
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BICUBIC)
            return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def take(self, n: int) -> SampleBatch:
        index = np.random.randint(0, len(self.paths), size=n)
        height, width = self.size
        images = torch.empty(n, 3, height, width, dtype=torch.uint8)
        for row, i in enumerate(index):
            images[row] = self._load(self.paths[i])
        first_read = first_reads(self.read, index)
        index = torch.from_numpy(index)
        return SampleBatch(images, self.source[index], self.target[index], self.strength[index], first_read)


class ReplayProducer:
    """A ``Producer`` serving batches of a ``ReplaySource``; it drops nothing."""

    dropped = 0

    def __init__(self, source: ReplaySource, batch_size: int):
        self.source, self.batch_size = source, batch_size

    def __call__(self) -> SampleBatch:
        return self.source.take(self.batch_size)


class ReplayProducerFactory:
    """A ``ProducerFactory`` that serves an offline Diff-Mix directory through a ring.

    ``GeneratorPool(ring, ReplayProducerFactory(root, class_names, size=..., batch_size=...), "cpu")``
    moves image decoding and resizing out of the training process.
    """

    def __init__(self, root: Union[str, os.PathLike], class_names: Sequence[str], *, size: Size, batch_size: int = 16):
        ReplaySource(root, class_names, size=size)  # fail here, in the training process, on a bad directory
        self.root, self.class_names, self.size, self.batch_size = os.fspath(root), list(class_names), size, batch_size

    def __call__(self, device: str) -> ReplayProducer:
        return ReplayProducer(ReplaySource(self.root, self.class_names, size=self.size), self.batch_size)


class SampleRecorder:
    """Writes samples in the offline Diff-Mix sampler's layout, readable by ``ReplaySource``.

    Images go to ``root/data/<source>/<target>-<number>-<strength>.png`` and one row per
    image is appended to ``root/meta.csv``. Several processes may write at once: each
    appends its rows with a single ``O_APPEND`` write, after the images exist.

    Args:
        root: An empty or absent directory.
        class_names: Class names in label order.
    """

    def __init__(self, root: Union[str, os.PathLike], class_names: Sequence[str]):
        self.root = os.fspath(root)
        self.class_names = list(class_names)
        if os.path.isdir(self.root) and os.listdir(self.root):
            raise ValueError(f"Recording directory {self.root!r} is not empty; pass a new or empty directory.")
        os.makedirs(os.path.join(self.root, "data"), exist_ok=True)
        with open(os.path.join(self.root, "meta.csv"), "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["First Directory", "Second Directory", "Number", "Strength", "Path"])

    def path_of(self, source: int, target: int, number: int, strength: float) -> str:
        """Where image ``number`` goes, relative to ``root/data``."""
        target_name = _folder_name(self.class_names[target])
        return os.path.join(_folder_name(self.class_names[source]),
                            f"{target_name}-{number:06d}-{round(float(strength), 4)}.png")

    def write(self, batch: SampleBatch, *, first_number: int) -> None:
        """Save ``batch``, numbering its images from ``first_number``."""
        lines = io.StringIO()
        writer = csv.writer(lines)
        for k in range(len(batch)):
            source = _folder_name(self.class_names[int(batch.source[k])])
            target = _folder_name(self.class_names[int(batch.target[k])])
            strength = round(float(batch.strength[k]), 4)
            path = self.path_of(int(batch.source[k]), int(batch.target[k]), first_number + k, strength)
            os.makedirs(os.path.join(self.root, "data", source), exist_ok=True)
            Image.fromarray(batch.images[k].permute(1, 2, 0).numpy()).save(os.path.join(self.root, "data", path))
            writer.writerow([source.replace("_", " "), target.replace("_", " "), first_number + k, strength, path])
        fd = os.open(os.path.join(self.root, "meta.csv"), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, lines.getvalue().encode("utf-8"))
        finally:
            os.close(fd)
