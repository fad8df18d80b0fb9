"""The demo world: a seeded, procedural, fine-grained bird data set with spurious backgrounds.

Twelve fictional species in three families. Species of a family share body shape, beak
and body colour and differ in one or two subtle attributes (wing, head or tail colour,
plumage pattern), so telling them apart is fine-grained. Each bird is drawn with a
random pose, size and position on a background from one of two environments, water or
land, each with varied textures and layouts.

Like Waterbirds, the environment is a spurious cue: every species has a home
environment, and the training set (and validation and in-distribution test sets) shows
a species at home with probability ``home_fraction`` (0.9). The counterfactual test set
puts every bird in the other environment. Groups are family × environment.

``render(species, environment, rng)`` draws one image and its bird mask;
``generic_corpus(count, seed)`` yields images of *random* birds with captions that
describe colours, shape and background in words and never name a species (what the
tiny generator is pretrained on, so that, like Stable Diffusion on CUB, it knows the
domain loosely and needs personalisation);
``write_demo_world(root)`` writes the ImageFolder tree ``train/ val/ test/
test_counterfactual/`` (each with ``groups.csv``), the bird masks under ``masks/``,
``world.json`` with the species' attributes and ``class_descriptions.json`` with each
species' attributes in words (``class_descriptions``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

ENVIRONMENTS = ("water", "land")
# 2: 100 test and counterfactual images per species (was 20), enough to see effects of a few points.
LAYOUT = 2
RENDER_SCALE = 2  # drawn at twice the size, then downsampled: antialiased edges


@dataclass(frozen=True)
class Species:
    """What makes a species: its family's shape and its colours and pattern."""

    name: str
    family: str
    body: tuple
    wing: tuple
    head: tuple
    tail: tuple
    pattern: str  # plain, striped or spotted (on the wing)
    home: str  # the environment it is mostly seen in


COLOURS = {
    "crimson": (200, 30, 40), "orange": (240, 140, 20), "yellow": (245, 215, 40), "lime": (140, 210, 40),
    "teal": (20, 150, 140), "blue": (40, 80, 210), "violet": (130, 60, 190), "white": (240, 240, 235),
    "black": (25, 25, 30), "brown": (120, 75, 40), "grey": (140, 140, 145), "pink": (240, 130, 170),
}
FAMILIES = {
    # body shape (width, height as fractions of the bird size), beak length, tail length
    "finch": dict(body=(0.62, 0.50), beak=0.16, tail=0.22),
    "wader": dict(body=(0.78, 0.36), beak=0.36, tail=0.16),
    "swift": dict(body=(0.70, 0.30), beak=0.10, tail=0.40),
}


def _species(name, family, body, wing, head, tail, pattern, home) -> Species:
    c = COLOURS
    return Species(name, family, c[body], c[wing], c[head], c[tail], pattern, home)


# Within a family every species shares body colour; neighbours differ in one or two attributes.
SPECIES = (
    _species("ember finch", "finch", "brown", "crimson", "black", "brown", "plain", "land"),
    _species("scarlet finch", "finch", "brown", "crimson", "black", "brown", "striped", "water"),
    _species("amber finch", "finch", "brown", "orange", "black", "brown", "plain", "water"),
    _species("hooded finch", "finch", "brown", "crimson", "white", "brown", "plain", "land"),
    _species("azure wader", "wader", "white", "blue", "blue", "white", "plain", "water"),
    _species("spotted wader", "wader", "white", "blue", "blue", "white", "spotted", "land"),
    _species("teal wader", "wader", "white", "teal", "blue", "white", "plain", "land"),
    _species("dusky wader", "wader", "white", "blue", "black", "black", "plain", "water"),
    _species("golden swift", "swift", "grey", "yellow", "grey", "yellow", "plain", "land"),
    _species("banded swift", "swift", "grey", "yellow", "grey", "yellow", "striped", "water"),
    _species("lime swift", "swift", "grey", "lime", "grey", "yellow", "plain", "water"),
    _species("rosy swift", "swift", "grey", "yellow", "pink", "violet", "plain", "land"),
)


def _jitter(colour: tuple, rng: np.random.Generator, amount: int = 12) -> tuple:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in colour)


def _background(environment: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Water: sky band, shore-less water with wave lines, maybe reeds. Land: sky, grass or sand
    with tufts, maybe trees or rocks. Random horizon, tones and texture density."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    horizon = int(size * rng.uniform(0.15, 0.45))
    sky = _jitter((150, 190, 230), rng, 30)
    draw.rectangle([0, 0, size, horizon], fill=sky)
    if environment == "water":
        ground = _jitter((40, 90, 160), rng, 30)
        draw.rectangle([0, horizon, size, size], fill=ground)
        line = _jitter((170, 205, 235), rng, 20)
        for _ in range(int(rng.integers(8, 24))):
            x, y = rng.integers(0, size), rng.integers(horizon + 2, size)
            length = int(rng.integers(size // 12, size // 4))
            draw.arc([x - length, y - 3, x + length, y + 3], 200, 340, fill=line, width=max(1, size // 64))
        if rng.random() < 0.5:  # reeds
            for _ in range(int(rng.integers(3, 9))):
                x = int(rng.integers(0, size))
                draw.line([x, size, x + int(rng.integers(-4, 5)), size - int(rng.integers(size // 6, size // 3))],
                          fill=_jitter((90, 120, 60), rng), width=max(1, size // 64))
    else:
        ground = _jitter((90, 150, 60) if rng.random() < 0.6 else (190, 165, 110), rng, 30)
        draw.rectangle([0, horizon, size, size], fill=ground)
        tuft = _jitter(tuple(v - 35 for v in ground), rng, 10)
        for _ in range(int(rng.integers(15, 40))):
            x, y = rng.integers(0, size), rng.integers(horizon + 2, size)
            draw.line([x, y, x + int(rng.integers(-3, 4)), y - int(rng.integers(2, 6))], fill=tuft,
                      width=max(1, size // 64))
        for _ in range(int(rng.integers(0, 3))):  # trees or rocks on the horizon
            x = int(rng.integers(0, size))
            r = int(rng.integers(size // 14, size // 7))
            if rng.random() < 0.5:
                draw.rectangle([x - r // 4, horizon - r, x + r // 4, horizon + r // 2], fill=(90, 60, 35))
                draw.ellipse([x - r, horizon - 2 * r, x + r, horizon - r // 2], fill=_jitter((40, 110, 50), rng))
            else:
                draw.ellipse([x - r, horizon - r // 2, x + r, horizon + r // 2], fill=_jitter((130, 130, 125), rng))
    return image


def _draw_bird(draw: ImageDraw.ImageDraw, species: Species, cx: float, cy: float, scale: float, facing: int,
               rng: np.random.Generator, fill_override=None) -> None:
    """The bird, facing right (``facing=1``) or left (-1); ``fill_override`` draws it in one colour (the mask)."""
    shape = FAMILIES[species.family]

    def colour(c):
        return fill_override if fill_override is not None else _jitter(c, rng, 8)

    w, h = shape["body"][0] * scale, shape["body"][1] * scale
    tail_len = shape["tail"] * scale
    back = cx - facing * w / 2
    tail = [(back, cy - h * 0.15), (back - facing * tail_len, cy - h * 0.45), (back - facing * tail_len, cy + h * 0.05)]
    if species.family == "swift":  # forked tail
        tail = [(back, cy), (back - facing * tail_len, cy - h * 0.5), (back - facing * tail_len * 0.6, cy),
                (back - facing * tail_len, cy + h * 0.5)]
    draw.polygon(tail, fill=colour(species.tail))
    draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=colour(species.body))
    head_r = 0.17 * scale
    hx, hy = cx + facing * (w / 2 - head_r * 0.3), cy - h / 2 - head_r * 0.2
    beak_len = shape["beak"] * scale
    tip = hx + facing * (head_r + beak_len)
    draw.polygon([(hx + facing * head_r * 0.8, hy - head_r * 0.25), (tip, hy + head_r * 0.1),
                  (hx + facing * head_r * 0.8, hy + head_r * 0.35)], fill=colour((230, 170, 40)))
    draw.ellipse([hx - head_r, hy - head_r, hx + head_r, hy + head_r], fill=colour(species.head))
    # Wing: an ellipse on the body, carrying the pattern.
    ww, wh = w * 0.55, h * 0.55
    wx, wy = cx - facing * w * 0.08, cy - h * 0.05
    box = [wx - ww / 2, wy - wh / 2, wx + ww / 2, wy + wh / 2]
    draw.ellipse(box, fill=colour(species.wing))
    if fill_override is None:
        draw.ellipse([hx + facing * head_r * 0.35 - 1.5, hy - head_r * 0.35 - 1.5,
                      hx + facing * head_r * 0.35 + 1.5, hy - head_r * 0.35 + 1.5], fill=(10, 10, 10))
        mark = (245, 245, 240) if sum(species.wing) < 450 else (30, 30, 30)
        if species.pattern == "striped":
            for k in (-1, 0, 1):
                x = wx + k * ww * 0.22
                draw.line([x, wy - wh * 0.38, x - facing * ww * 0.08, wy + wh * 0.38], fill=mark,
                          width=max(2, int(scale / 12)))
        elif species.pattern == "spotted":
            r = max(2.0, scale / 18)
            for dx, dy in ((-0.25, -0.1), (0.0, 0.2), (0.22, -0.12), (-0.02, -0.28)):
                x, y = wx + dx * ww, wy + dy * wh
                draw.ellipse([x - r, y - r, x + r, y + r], fill=mark)


def render(species: Species, environment: str, rng: np.random.Generator, size: int = 64):
    """One image of ``species`` in ``environment``: (RGB ``PIL.Image``, bool mask ``[size, size]``)."""
    if environment not in ENVIRONMENTS:
        raise ValueError(f"environment must be one of {ENVIRONMENTS}, got {environment!r}.")
    big = size * RENDER_SCALE
    image = _background(environment, big, rng)
    scale = big * rng.uniform(0.42, 0.62)
    facing = 1 if rng.random() < 0.5 else -1
    margin = scale * 0.55
    cx, cy = rng.uniform(margin, big - margin), rng.uniform(margin, big - margin * 0.8)
    _draw_bird(ImageDraw.Draw(image), species, cx, cy, scale, facing, rng)
    mask = Image.new("L", (big, big), 0)  # the same bird again, in one colour (its geometry draws nothing random)
    _draw_bird(ImageDraw.Draw(mask), species, cx, cy, scale, facing, rng, fill_override=255)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    mask = np.asarray(mask.resize((size, size), Image.Resampling.BILINEAR)) >= 128
    return image, mask


def colour_name(colour: tuple) -> str:
    return next(name for name, value in COLOURS.items() if value == colour)


def random_species(rng: np.random.Generator) -> Species:
    """A bird of a random family with random colours and pattern: the generic corpus's subjects."""
    names = list(COLOURS)
    pick = [names[int(i)] for i in rng.integers(0, len(names), 4)]
    family = list(FAMILIES)[int(rng.integers(len(FAMILIES)))]
    pattern = ("plain", "striped", "spotted")[int(rng.integers(3))]
    return _species("bird", family, *pick, pattern, ENVIRONMENTS[int(rng.integers(2))])


def caption(species: Species, environment: str, rng: np.random.Generator | None = None) -> str:
    """Words for what is visible — shape, colours, pattern, background — never the species' name.

    With ``rng``, a varied caption: each attribute is named with probability 0.8 and half
    the captions start "a photo of", so that the model also learns to draw from sparse
    prompts such as the personalisation prompt "a photo of a <class_i> bird".
    """
    return _described(species, environment, rng)[0]


# The demo has no CLIP: a caption's similarity to its image is the share of the image's six visible
# attributes (shape, body, wings, head, tail, background) it names, placed on [0.2, 0.4], about where
# CLIP puts captions that fit (the SGID report quotes 0.30 and 0.40), so SGID's guidance mapping applies.
DEMO_SIMILARITY = (0.2, 0.4)
ATTRIBUTES = 6


def scored_caption(species: Species, environment: str, rng: np.random.Generator) -> tuple[str, float]:
    """A varied caption of an image (``caption``) and its similarity to it (``DEMO_SIMILARITY``)."""
    text, named = _described(species, environment, rng)
    low, high = DEMO_SIMILARITY
    return text, low + (high - low) * named / ATTRIBUTES


def _described(species: Species, environment: str, rng: np.random.Generator | None) -> tuple[str, int]:
    """``caption``'s text and how many of the ``ATTRIBUTES`` it names."""
    keep = (lambda: True) if rng is None else (lambda: rng.random() < 0.8)
    shape = {"finch": "round", "wader": "long-billed", "swift": "slender fork-tailed"}[species.family]
    head, tail = colour_name(species.head), colour_name(species.tail)
    pattern = "" if species.pattern == "plain" else f"{species.pattern} "
    words = [w for w, k in ((shape, keep()), (colour_name(species.body), keep())) if k]
    parts = [p for p, k in ((f"{pattern}{colour_name(species.wing)} wings", keep()),
                            (f"{_article(head)} {head} head", keep()), (f"{_article(tail)} {tail} tail", keep())) if k]
    named = len(words) + len(parts)
    text = " ".join(words + ["bird"])
    text = f"{_article(text)} {text}"
    if parts:
        text += " with " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])
    if keep():
        text += f", on {environment}"
        named += 1
    if rng is not None and rng.random() < 0.5:
        text = "a photo of " + text
    return text, named


def class_descriptions() -> dict:
    """``{species name: words}``: each species' visible attributes in the caption words the demo
    generator was pretrained on, without a background; what a user with attribute annotations
    (CUB has 312) could give ``onlinemix finetune --class-descriptions``."""
    return {s.name: caption(s, ENVIRONMENTS[0]).split(", on ")[0] for s in SPECIES}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def generic_corpus(count: int, seed: int = 0, size: int = 64):
    """``count`` (image, varied caption) pairs of random birds in random environments, seeded."""
    rng = np.random.default_rng([seed, 7919])
    for _ in range(count):
        species = random_species(rng)
        environment = ENVIRONMENTS[int(rng.integers(2))]
        image = render(species, environment, rng, size)[0]
        yield image, caption(species, environment, rng)


def environments_for(count: int, home: str, home_fraction: float, rng: np.random.Generator) -> list:
    """``count`` environments, exactly ``round(home_fraction · count)`` of them ``home``, shuffled."""
    other = ENVIRONMENTS[1 - ENVIRONMENTS.index(home)]
    at_home = int(round(home_fraction * count))
    chosen = [home] * at_home + [other] * (count - at_home)
    return [chosen[i] for i in rng.permutation(count)]


def write_demo_world(root: str, *, seed: int = 0, train_per_class: int = 10, val_per_class: int = 5,
                     test_per_class: int = 100, home_fraction: float = 0.9, size: int = 64) -> None:
    """Write the demo world's splits under ``root`` (see the module docstring)."""
    if not 0.5 <= home_fraction <= 1:
        raise ValueError(f"home_fraction must lie in [0.5, 1], got {home_fraction}.")
    plan = (("train", train_per_class, home_fraction), ("val", val_per_class, home_fraction),
            ("test", test_per_class, home_fraction), ("test_counterfactual", test_per_class, 0.0))
    for s, (split, count, fraction) in enumerate(plan):
        rows = ["file,group"]
        for c, species in enumerate(SPECIES):
            rng = np.random.default_rng([seed, s, c])
            folder = os.path.join(root, split, species.name)
            masks = os.path.join(root, "masks", split, species.name)
            os.makedirs(folder, exist_ok=True)
            os.makedirs(masks, exist_ok=True)
            for i, environment in enumerate(environments_for(count, species.home, fraction, rng)):
                image, mask = render(species, environment, rng, size)
                file = f"{i:04d}.png"
                image.save(os.path.join(folder, file))
                Image.fromarray(mask).save(os.path.join(masks, file))
                rows.append(f"{species.name}/{file},{species.family}/{environment}")
        with open(os.path.join(root, split, "groups.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")
    with open(os.path.join(root, "class_descriptions.json"), "w") as f:
        json.dump(class_descriptions(), f, indent=2)
    with open(os.path.join(root, "world.json"), "w") as f:
        json.dump({"layout": LAYOUT, "seed": seed, "size": size, "home_fraction": home_fraction, "metaclass": "bird",
                   "per_class": {split: count for split, count, _ in plan},
                   "species": [asdict(sp) for sp in SPECIES]}, f, indent=2)


def check_demo_world(root: str) -> None:
    """Refuse a demo world written by an older layout: its test sets differ from the ones results quote."""
    with open(os.path.join(root, "world.json")) as f:
        layout = json.load(f).get("layout", 1)
    if layout != LAYOUT:
        raise ValueError(f"{root!r} holds a demo world of layout {layout} (an older onlinemix wrote it; layout {LAYOUT} "
                         "has 100 test images per species): delete the folder and run again to write the current one.")
