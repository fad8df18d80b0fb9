"""SGID's caption store, its weighted prompt and its guidance from each caption's similarity.

SGID (Li, Xu and Wang 2023; the replication report in seed 004) translates every training image
toward its own class with a prompt that joins the image's best caption to its label,
"{caption}. A picture of {label}", the label weighted above the caption (1.5 against 0.9),
and a guidance scale set by how well the caption fits the image.

The store (``onlinemix caption --out FILE``, or a user's own file) is JSON: an object whose
``rows`` list holds ``{"id": ..., "caption": ..., "similarity": ...}`` per training image,
``id`` as the data set names the image (``Split.image_ids``: ``<class folder>/<file>`` for an
image folder, the row number for a ``datasets`` split), ``similarity`` the CLIP cosine of
image and caption in [-1, 1]; the other keys record how it was made.

Guidance: the report's mapping ``f(s) = -4·s² + 2·s + 1`` gives 1 at s = 0, its peak 1.25 at
s = 0.25 and 1 again at s = 0.5 — a multiplier near 1, far below Stable Diffusion's scales, so
it scales the generator's guidance: ``g = max(1, g₀·f(s))`` with ``g₀`` the sample's scale
without captions (``--guidance``, default 7.5). For the similarities CLIP gives matching
captions (the report quotes 0.30 and 0.40) that is 1.16–1.24·g₀, 8.7–9.3 at 7.5. The report's
"higher similarity, higher guidance" holds only below 0.25: past its peak f falls.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np

# SGID's weights in the report: the label above the caption.
CAPTION_WEIGHTS = (0.9, 1.5)


def guidance_factor(similarity):
    """SGID's guidance mapping ``f(s) = -4·s² + 2·s + 1`` of an image–caption similarity ``s``."""
    s = np.asarray(similarity, dtype=np.float64)
    return -4.0 * s**2 + 2.0 * s + 1.0


def captioned_guidance(similarity, base: float):
    """The guidance scale of a sample whose caption has ``similarity``: ``max(1, base·f(s))``, ``base``
    the scale it would have without captions (a scale below 1 would extrapolate away from the prompt)."""
    return np.maximum(1.0, float(base) * guidance_factor(similarity))


def captioned_prompt(caption: str, name: str, weights: Sequence[float] = CAPTION_WEIGHTS) -> tuple:
    """SGID's prompt "{caption}. A picture of {name}" as weighted fragments (``Sampler.embed``): the
    caption's tokens weigh ``weights[0]``, the class name's ``weights[1]``, the joining words 1."""
    caption_weight, label_weight = check_caption_weights(weights)
    return ((caption, caption_weight), (". A picture of", 1.0), (name, label_weight))


def check_caption_weights(weights: Sequence[float]) -> tuple[float, float]:
    """``(caption weight, label weight)``, both > 0."""
    values = [float(v) for v in np.atleast_1d(weights)]
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"Caption weights are CAPTION LABEL, both > 0 (SGID's: 0.9 1.5), got {values}.")
    return values[0], values[1]


def check_caption_options(strategy, captions: Optional[str], weights: Sequence[float]) -> None:
    """Stop on caption options ``strategy`` (a ``Strategy``) cannot run: a captioned strategy without a
    store, a store for a strategy that reads none, weights <= 0."""
    if strategy.captioned and not captions:
        raise ValueError(f"{strategy.name} prompts with each training image's caption: pass --captions "
                         "(captions=), a file from `onlinemix caption --out FILE` or your own "
                         "(see docs/usage/caption.md).")
    if captions and not strategy.captioned:
        raise ValueError(f"{strategy.name} reads no captions; --captions (captions=) is for sgid.")
    check_caption_weights(weights)


class CaptionStore:
    """Every image's chosen caption and its similarity, by image id.

    Args:
        rows: ``{image id: (caption, similarity)}``.
        info: The file's other keys (how it was made).
    """

    def __init__(self, rows: dict, info: dict):
        self.rows, self.info = rows, info

    @classmethod
    def load(cls, path: str) -> "CaptionStore":
        """Read and check a store file: every row an id, a non-empty caption and a similarity in [-1, 1]."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No caption store at {path!r}; make one with `onlinemix caption --out {path}` "
                                    "on this run's data options, or bring your own (see docs/usage/caption.md).")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"The caption store {path!r} is not JSON ({error}).") from None
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ValueError(f"The caption store {path!r} must be a JSON object whose 'rows' list holds "
                             '{"id": ..., "caption": ..., "similarity": ...} per image.')
        rows = {}
        for number, row in enumerate(data["rows"]):
            key, value = cls._checked_row(path, number, row)
            if key in rows:
                raise ValueError(f"The caption store {path!r} holds image id {key!r} twice (row {number}).")
            rows[key] = value
        return cls(rows, {k: v for k, v in data.items() if k != "rows"})

    @staticmethod
    def _checked_row(path: str, number: int, row) -> tuple:
        where = f"Row {number} of the caption store {path!r}"
        if not isinstance(row, dict) or not {"id", "caption", "similarity"} <= set(row):
            raise ValueError(f"{where} must hold id, caption and similarity, got {row!r}.")
        caption, similarity = row["caption"], row["similarity"]
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where} (image {row['id']!r}) has no caption.")
        if (isinstance(similarity, bool) or not isinstance(similarity, (int, float)) or not math.isfinite(similarity)
                or not -1 <= similarity <= 1):
            raise ValueError(f"{where} (image {row['id']!r}) has similarity {similarity!r}; a cosine similarity "
                             "lies in [-1, 1] (CLIP's of an image and its caption, about 0.2-0.4).")
        return str(row["id"]), (caption.strip(), float(similarity))

    def select(self, image_ids: Sequence) -> tuple[list[str], np.ndarray]:
        """The captions and similarities of ``image_ids``, in order; an error names the missing ones."""
        ids = [str(i) for i in image_ids]
        missing = [i for i in ids if i not in self.rows]
        if missing:
            raise ValueError(f"The caption store has no caption for {len(missing)} of the {len(ids)} training images "
                             f"(first: {missing[:3]}); caption them with `onlinemix caption` on this run's data "
                             "options, or add them to your file.")
        return [self.rows[i][0] for i in ids], np.array([self.rows[i][1] for i in ids], dtype=np.float64)
