"""The condition store of ``onlinemix invert`` and the perturbed conditions Diffusion Inversion samples from.

A store folder holds ``conditions.safetensors`` (``conditions`` ``[N, L, D]``, their ``mean``
``[L, D]``, the image ``ids`` and ``labels``) and ``inversion.json`` (the resolution it was
learned at, the classes, the training images' fingerprint). ``ConditionStore.check`` stops,
in the training process, a store that does not belong to the run; a worker then asks
``perturbed`` for each request's condition:

- Gaussian: ``ĉ = c + λ·ε``, ``ε ~ N(0, I)`` drawn from the request's seed;
- interpolation within a class: ``ĉ = (1 - α)·c₁ + α·c₂ (+ λ·ε)``, ``α`` the partner ``c₂``'s weight
  (the method's sampler: α = 0.1, then λ = 0.1).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

STORE = "conditions.safetensors"
STORE_JSON = "inversion.json"


def read_store_info(folder: str) -> dict:
    """``inversion.json`` of a store folder; a clear error when the folder holds no store."""
    path = os.path.join(folder, STORE_JSON)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, STORE)):
        raise FileNotFoundError(f"{folder!r} holds no condition store ({STORE} and {STORE_JSON}); make one with "
                                "`onlinemix invert --out FOLDER` on this run's data options.")
    with open(path) as f:
        return json.load(f)


def check_inversion_options(strategy, store: Optional[str], noise: float, interpolation) -> None:
    """Stop on inversion options ``strategy`` (a ``Strategy``) cannot run: an inverted strategy without a
    store folder, λ < 0, an interpolation range outside [0, 1] or on a strategy without conditions."""
    from ..plan import check_interpolation

    if strategy.inverted and not store:
        raise ValueError(f"{strategy.name} samples from the conditions `onlinemix invert` learned for each training "
                         "image: pass --inversion (inversion=), the store's folder.")
    if noise < 0:
        raise ValueError(f"--inversion-noise (inversion_noise, lambda) must be >= 0, got {noise}.")
    if interpolation is not None:
        check_interpolation(strategy, interpolation)


class ConditionStore:
    """The learned conditions of every training image, and guidance's unconditional input, their mean.

    Args:
        conditions: ``[N, L, D]``, row ``i`` the condition of training image ``i``.
        mean: ``[L, D]``, the mean of all conditions.
        labels: ``[N]``, each image's class.
        info: The store's ``inversion.json``.
    """

    def __init__(self, conditions: torch.Tensor, mean: torch.Tensor, labels: torch.Tensor, info: dict):
        self.conditions, self.mean, self.labels, self.info = conditions.float(), mean.float(), labels, info

    @classmethod
    def load(cls, folder: str) -> "ConditionStore":
        from safetensors.torch import load_file

        info = read_store_info(folder)
        tensors = load_file(os.path.join(folder, STORE))
        return cls(tensors["conditions"], tensors["mean"], tensors["labels"], info)

    @staticmethod
    def check(folder: str, references, class_names: Sequence[str], resolution: int) -> dict:
        """Stop on a store that another data set, class list or resolution made; returns its info.

        Args:
            folder: The store folder (``onlinemix invert --out``).
            references: The run's training images (``labels``, and ``fingerprint()`` when it has one).
            class_names: The run's classes in label order.
            resolution: The resolution the generator samples at.
        """
        from safetensors import safe_open

        info = read_store_info(folder)
        with safe_open(os.path.join(folder, STORE), framework="pt") as f:
            ids, labels = f.get_tensor("ids"), f.get_tensor("labels")
        again = "invert again with this run's data options, or use the store made for them"
        if len(info["class_names"]) != len(class_names):
            raise ValueError(f"The condition store in {folder!r} knows {len(info['class_names'])} classes but the data "
                             f"set has {len(class_names)}; {again}.")
        expected = np.asarray(references.labels, dtype=np.int64)
        if not torch.equal(ids, torch.arange(len(expected))) or not np.array_equal(labels.numpy(), expected):
            raise ValueError(f"The condition store in {folder!r} holds {len(ids)} images whose ids or labels differ "
                             f"from this run's {len(expected)} training images; {again}.")
        fingerprint = getattr(references, "fingerprint", None)
        if fingerprint is not None and info.get("training_images") not in (None, fingerprint()):
            stored, actual = info["training_images"], fingerprint()
            raise ValueError(f"The condition store in {folder!r} was learned on other training images ({stored['count']} "
                             f"images, sha256 {stored['sha256'][:12]}) than this run trains on ({actual['count']} "
                             f"images, sha256 {actual['sha256'][:12]}); {again}.")
        if info["resolution"] != resolution:
            raise ValueError(f"The condition store in {folder!r} was learned at {info['resolution']} px, but the "
                             f"generator samples at {resolution} px: conditions only reconstruct at the resolution "
                             f"they were learned at. Pass --gen-resolution {info['resolution']}, or invert again "
                             f"with --resolution {resolution}.")
        return info

    def perturbed(self, requests: Sequence, noise: float) -> torch.Tensor:
        """``[B, L, D]``: each request's condition (``reference``, mixed with ``partner`` at weight ``alpha``
        when it has one), plus ``noise``·ε with ε drawn from the request's seed."""
        if noise < 0:
            raise ValueError(f"The perturbation strength lambda must be >= 0, got {noise}.")
        out = []
        for r in requests:
            c = self.conditions[r.reference]
            if r.partner >= 0 and r.alpha > 0:
                c = (1 - r.alpha) * c + r.alpha * self.conditions[r.partner]
            if noise > 0:
                # A stream of its own: the seed also draws the sample's initial latents.
                generator = torch.Generator().manual_seed(int(np.random.default_rng([r.seed, 1]).integers(2**62)))
                c = c + noise * torch.randn(c.shape, generator=generator)
            out.append(c)
        return torch.stack(out)
