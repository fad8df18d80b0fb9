"""Batched SDEdit translation with mixed strengths, and batched text-to-image.

For samples of one strength the result equals diffusers'
``StableDiffusionImg2ImgPipeline`` (``StableDiffusionPipeline`` for text-to-image)
on the same components, settings and per-sample generators: the same posterior
and noise draws, the same DPM-Solver++ steps. What changes is the batching:

- samples of different strengths share one batch. They all follow the same
  timestep schedule; a sample of strength ``s`` joins it at step
  ``steps - denoising_steps(steps, s)``, diffusers' own arithmetic, so at every
  step the active samples sit at the same timestep and take one U-Net call
  together. Samples that join at the same step share a scheduler state (solver
  history), so every sample is stepped exactly as a single-strength run would
  step it;
- prompt embeddings, the unconditional one included, are computed once per
  prompt and cached.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .components import Components


def denoising_steps(steps: int, strength: float) -> int:
    """How many of a ``steps``-step schedule an SDEdit of ``strength`` runs.

    diffusers' img2img arithmetic, ``min(int(steps·s), steps)`` on the strength as a
    Python float: the same value rounded to float32 (0.7 -> 0.69999999) runs one
    step fewer for some pairs (10 steps at 0.7, 25 at 0.52, 50 at 0.9), so
    strengths must never pass through a float32 tensor on their way here.
    """
    return min(int(steps * float(strength)), steps)


def check_steps(steps: int, strengths) -> None:
    """Every strength must run at least one denoising step (``denoising_steps``)."""
    for strength in strengths:
        if denoising_steps(steps, strength) < 1:
            raise ValueError(
                f"Strength {float(strength)} with {steps} steps runs no denoising step "
                f"(int({steps}·{float(strength)}) = 0); use at least {int(np.ceil(1 / float(strength)))} steps "
                "or a higher strength."
            )


@dataclass
class _Group:
    """Samples that join the schedule at the same step: their rows in the batch, scheduler, first step and latents."""

    rows: torch.Tensor
    scheduler: object
    start: int
    latents: torch.Tensor


class Sampler:
    """Translate or generate batches with one set of components.

    Args:
        components: The generator (see ``components.py``).
        steps: Denoising steps of the full schedule (img2img runs ``int(steps·s)`` of them).
        guidance: Classifier-free guidance scale; 1 turns guidance off.
    """

    def __init__(self, components: Components, *, steps: int = 25, guidance: float = 7.5):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        if guidance < 1:
            raise ValueError(f"guidance must be >= 1 (1 turns classifier-free guidance off), got {guidance}.")
        self.components = components
        self.steps = steps
        self.guidance = guidance
        self._embeddings: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder states ``[B, 77, D]`` of ``prompts``, cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            c = self.components
            ids = c.tokenizer(missing, padding="max_length", max_length=c.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
            states = c.text_encoder(ids.to(c.device))[0].to(c.dtype)
            self._embeddings.update(zip(missing, states))
        return torch.stack([self._embeddings[p] for p in prompts])

    @torch.no_grad()
    def translate(self, images: torch.Tensor, prompts: Sequence[str], strengths: Sequence[float],
                  seeds: Sequence[int]) -> torch.Tensor:
        """SDEdit each image toward its prompt at its strength.

        Args:
            images: float ``[B, 3, H, W]`` in ``[0, 1]``, ``H`` and ``W`` multiples of 8.
            prompts: One prompt per image.
            strengths: One strength in ``(0, 1]`` per image, as Python floats (see
                ``denoising_steps``); they may differ.
            seeds: One seed per image (its posterior sample, then its noise).

        Returns:
            float32 ``[B, 3, H, W]`` in ``[0, 1]`` on the CPU.
        """
        c = self.components
        self._check(len(images), prompts, strengths, seeds)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        pixels = (images.to(c.device, c.dtype) * 2 - 1)
        posterior = c.vae.encode(pixels).latent_dist
        shape = (1, *posterior.mean.shape[1:])
        eps = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(c.device, c.dtype)
        latents = (posterior.mean + posterior.std * eps) * c.vae.config.scaling_factor
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(c.device, c.dtype)
        groups = []
        starts = torch.tensor([self.steps - denoising_steps(self.steps, s) for s in strengths])
        for first in sorted(set(starts.tolist())):
            rows = torch.nonzero(starts == first).flatten()
            scheduler, start = self._scheduler(first)
            t = scheduler.timesteps[start:start + 1].repeat(len(rows))
            start_latents = scheduler.add_noise(latents[rows], noise[rows], t)
            groups.append(_Group(rows, scheduler, start, start_latents))
        return self._denoise(groups, prompts, len(images))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, height: int, width: int) -> torch.Tensor:
        """Text-to-image; returns float32 ``[B, 3, height, width]`` in ``[0, 1]`` on the CPU."""
        c = self.components
        self._check(len(prompts), prompts, [1.0] * len(prompts), seeds)
        f = c.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}.")
        shape = (1, c.unet.config.in_channels, height // f, width // f)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        scheduler, start = self._scheduler(0)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(c.device, c.dtype)
        group = _Group(torch.arange(len(prompts)), scheduler, start, latents * scheduler.init_noise_sigma)
        return self._denoise([group], prompts, len(prompts))

    def _check(self, count: int, prompts, strengths, seeds) -> None:
        if not (len(prompts) == len(strengths) == len(seeds) == count):
            raise ValueError(
                f"Need one prompt, strength and seed per sample: got {count} samples, {len(prompts)} prompts, "
                f"{len(strengths)} strengths, {len(seeds)} seeds."
            )
        if any(not 0 < float(s) <= 1 for s in strengths):
            raise ValueError(f"strengths must lie in (0, 1], got {list(strengths)}.")
        check_steps(self.steps, strengths)

    def _scheduler(self, first_step: int):
        """A fresh scheduler positioned at ``first_step`` of the schedule, as diffusers' img2img positions it."""
        scheduler = copy.deepcopy(self.components.scheduler)
        scheduler.set_timesteps(self.steps, device=self.components.device)
        start = first_step * scheduler.order
        scheduler.set_begin_index(start)
        return scheduler, start

    def _denoise(self, groups: list[_Group], prompts: Sequence[str], count: int) -> torch.Tensor:
        c = self.components
        cfg = self.guidance > 1
        cond = self.embed(prompts)
        uncond = self.embed([""])
        timesteps = groups[0].scheduler.timesteps
        for step, t in enumerate(timesteps):
            active = [g for g in groups if g.start <= step]
            if not active:
                continue
            latents = torch.cat([g.latents for g in active])
            states = cond[torch.cat([g.rows for g in active])]
            if cfg:
                latents = torch.cat([latents, latents])
                states = torch.cat([uncond.expand(len(states), -1, -1), states])
            noise = c.unet(latents, t, encoder_hidden_states=states, return_dict=False)[0]
            if cfg:
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + self.guidance * (noise_text - noise_uncond)
            for group, part in zip(active, noise.split([len(g.rows) for g in active])):
                group.latents = group.scheduler.step(part, t, group.latents, return_dict=False)[0]
        first = groups[0].latents
        latents = torch.empty((count, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for group in groups:
            latents[group.rows] = group.latents
        images = c.vae.decode(latents / c.vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()
