"""The paper's data cleaning, online: drop synthetic images CLIP doubts show a {metaclass}.

CLIP scores each image on "a photo with a {metaclass} on it" against "a photo
without a {metaclass} on it" (softmax over the two). Offline, Diff-Mix dropped the
lowest 10% of the whole synthetic set; online there is no whole set, so a sample
is dropped when its score falls below the running ``drop_fraction`` quantile of
the last ``window`` scores.
"""
from __future__ import annotations

import collections
import os
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F


def load_clip(model: Union[str, os.PathLike], *, device="cpu", dtype=torch.float32, local_files_only=False):
    """``(CLIPModel, tokenizer)`` from a folder or hub id, the model in eval mode on ``device``."""
    from transformers import CLIPModel, CLIPTokenizer

    try:
        clip = CLIPModel.from_pretrained(model, torch_dtype=dtype, local_files_only=local_files_only)
        tokenizer = CLIPTokenizer.from_pretrained(model, local_files_only=local_files_only)
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load the CLIP model {os.fspath(model)!r} ({str(error).splitlines()[0]}); pass a local "
            "folder holding a saved CLIPModel and its tokenizer."
        ) from None
    return clip.to(device).eval(), tokenizer


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's own preprocessing (``CLIPImageProcessor``) of float images ``[B, 3, H, W]`` in ``[0, 1]``, on
    their device: the short side resized to ``size`` (bicubic, antialiased; the long side in proportion,
    truncated), the centre ``size`` x ``size`` crop, normalised with CLIP's mean and std. Stretching a
    500 x 375 image to a square instead distorts every shape CLIP was trained on."""
    from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    height, width = images.shape[-2:]
    short = min(height, width)
    resized = (size, int(size * width / short)) if height == short else (int(size * height / short), size)
    pixels = F.interpolate(images.float(), size=resized, mode="bicubic", antialias=True).clamp_(0, 1)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    pixels = pixels[..., top:top + size, left:left + size]
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def clip_image_features(model, images: torch.Tensor) -> torch.Tensor:
    """Unit-norm float32 CLIP embeddings ``[B, E]`` of float images ``[B, 3, H, W]`` in ``[0, 1]``,
    preprocessed as CLIP's image processor does (``clip_pixels``)."""
    pixels = clip_pixels(images.to(model.device), model.config.vision_config.image_size)
    features = model.get_image_features(pixel_values=pixels.to(model.dtype))
    # transformers 5 may return an output object whose pooler_output holds the projection.
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def clip_text_features(model, tokenizer, texts) -> torch.Tensor:
    """Unit-norm float32 CLIP embeddings ``[B, E]`` of ``texts`` (cut to CLIP's 77 tokens)."""
    ids = tokenizer(list(texts), padding=True, truncation=True,
                    max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(model.device)
    features = model.get_text_features(**ids)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return F.normalize(features.float(), dim=-1)


class ClipFilter:
    """Keep-or-drop decisions for batches of synthetic images.

    Args:
        model: A ``transformers.CLIPModel``.
        tokenizer: Its tokenizer.
        metaclass: What every image should show ("bird", "car" ...).
        drop_fraction: Share of samples to drop (the paper: 0.1).
        window: How many recent scores the running quantile is taken over.
        warmup: Keep everything until this many scores have been seen.
    """

    def __init__(self, model, tokenizer, metaclass: str, *, drop_fraction: float = 0.1, window: int = 2048,
                 warmup: int = 64):
        if not 0 <= drop_fraction < 1:
            raise ValueError(f"drop_fraction must lie in [0, 1), got {drop_fraction}.")
        self.model = model.eval()
        self.drop_fraction = drop_fraction
        self.warmup = warmup
        self.scores: collections.deque = collections.deque(maxlen=window)
        captions = [f"a photo with a {metaclass} on it", f"a photo without a {metaclass} on it"]
        self.text = clip_text_features(self.model, tokenizer, captions)
        self.kept = 0
        self.dropped = 0

    @classmethod
    def from_pretrained(cls, model: Union[str, os.PathLike], metaclass: str, *, device="cpu",
                        dtype=torch.float32, local_files_only=False, **kwargs) -> "ClipFilter":
        """Load CLIP (e.g. ``openai/clip-vit-base-patch32``, the paper's) from a folder or hub id."""
        clip, tokenizer = load_clip(model, device=device, dtype=dtype, local_files_only=local_files_only)
        return cls(clip, tokenizer, metaclass, **kwargs)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        """P("with a {metaclass}") for float images ``[B, 3, H, W]`` in ``[0, 1]``."""
        logits = self.model.logit_scale.exp().float() * clip_image_features(self.model, images) @ self.text.T
        return logits.softmax(-1)[:, 0].cpu()

    def keep(self, images: torch.Tensor) -> torch.Tensor:
        """Bool ``[B]``: which images to keep. Updates the running window."""
        scores = self.score(images)
        self.scores.extend(scores.tolist())
        if len(self.scores) < self.warmup or self.drop_fraction == 0:
            keep = torch.ones(len(scores), dtype=torch.bool)
        else:
            threshold = float(np.quantile(np.fromiter(self.scores, float), self.drop_fraction))
            keep = scores >= threshold
        self.kept += int(keep.sum())
        self.dropped += int((~keep).sum())
        return keep
