"""A toy data set of coloured shapes on striped backgrounds, generated in a second: for tests and for
trying the trainer without a download (``--dataset toy``)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw


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
