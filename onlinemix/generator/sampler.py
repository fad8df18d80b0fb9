"""SDEdit translation and text-to-image with continuous batching, equal to diffusers' pipelines.

For samples of one strength the result equals diffusers'
``StableDiffusionImg2ImgPipeline`` (``StableDiffusionPipeline`` for text-to-image)
on the same components, settings and per-sample generators: the same posterior
and noise draws, the same DPM-Solver++ steps. What changes is the batching.

Every sample lives in a ``Trajectory``: the samples admitted together at the same
first step of the schedule, with their own scheduler state (the solver's history)
and their own position in the schedule. ``Sampler.step`` advances every trajectory
it is given by one step in one U-Net call, each row at its own timestep (the
diffusers U-Net takes a timestep per sample). So samples of different strengths,
and samples admitted at different times, share every U-Net call: a caller keeps
the batch full by admitting new samples as soon as a trajectory finishes
(``onlinemix.generator.worker``), or drains one batch (``translate``, ``generate``).

What is cached: prompt embeddings (the unconditional one included), once per
prompt; each reference's VAE posterior, in a bounded LRU keyed by the caller's
reference key (``posteriors``); and, with ``deep_cache=k``, the U-Net's deep
features, recomputed every ``k``-th step of each trajectory (``deep_cache.py``;
an approximation, unlike the others).
"""
from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import numpy as np
import torch

from .components import Components
from .deep_cache import DeepCacheUNet


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
class Trajectory:
    """Samples admitted together at one first step: they share a scheduler state and a position.

    Attributes:
        tags: The caller's tag per sample (a request, a row index), handed back when done.
        scheduler: Their DPM-Solver++ state.
        index: Position in ``scheduler.timesteps`` of the next step.
        latents: ``[n, C, h, w]``.
        states: Prompt embeddings ``[n, 77, D]``.
        generators: The samples' generators, for schedulers that draw noise while stepping (LCM, TCD).
        taken: Steps taken so far (DeepCache refreshes the deep features when ``taken % k == 0``).
        deep: Cached deep features ``[copies, n, ...]`` (two copies under guidance: unconditional, conditional).
    """

    tags: list
    scheduler: object
    index: int
    latents: torch.Tensor
    states: torch.Tensor
    generators: list
    taken: int = 0
    deep: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def done(self) -> bool:
        return self.index >= len(self.scheduler.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.index]


class Sampler:
    """Translate or generate with one set of components.

    Args:
        components: The generator (see ``components.py``).
        steps: Denoising steps of the full schedule (img2img runs ``int(steps·s)`` of them).
        guidance: Classifier-free guidance scale; 1 turns guidance off.
        deep_cache: Recompute the U-Net's deep features every ``deep_cache``-th step of a
            trajectory and reuse them in between (DeepCache); 1 (default): never reuse, exact.
        posterior_cache: How many references' VAE posteriors ``posteriors`` keeps (LRU).
    """

    def __init__(self, components: Components, *, steps: int = 25, guidance: float = 7.5, deep_cache: int = 1,
                 posterior_cache: int = 0):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        if guidance < 1:
            raise ValueError(f"guidance must be >= 1 (1 turns classifier-free guidance off), got {guidance}.")
        if deep_cache < 1:
            raise ValueError(f"deep_cache must be >= 1 (1 recomputes every step), got {deep_cache}.")
        if posterior_cache < 0:
            raise ValueError(f"posterior_cache must be >= 0, got {posterior_cache}.")
        self.components = components
        # diffusers finds a model's dtype by walking its parameters (ms each): read once, so move
        # the components before building a sampler.
        self.device, self.dtype = components.device, components.dtype
        self.steps = steps
        self.guidance = guidance
        self.deep_cache = deep_cache
        self.posterior_cache = posterior_cache
        self._unet = DeepCacheUNet(components.unet) if deep_cache > 1 else None
        # As diffusers' pipelines do: a scheduler whose step takes a generator draws noise with each
        # sample's, and one whose step takes eta (DDIM, TCD) gets the pipelines' default, 0.
        accepts = inspect.signature(components.scheduler.step).parameters
        self._stochastic = "generator" in accepts
        self._step_kwargs = {"eta": 0.0} if "eta" in accepts else {}
        self._embeddings: dict[str, torch.Tensor] = {}
        self._posteriors: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.posterior_hits = 0
        self.posterior_misses = 0

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder states ``[B, 77, D]`` of ``prompts``, cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            c = self.components
            ids = c.tokenizer(missing, padding="max_length", max_length=c.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
            states = c.text_encoder(ids.to(self.device))[0].to(self.dtype)
            self._embeddings.update(zip(missing, states))
        return torch.stack([self._embeddings[p] for p in prompts])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE posterior moments ``[B, 2C, h, w]`` (mean, log-variance) of float ``[B, 3, H, W]`` images in [0, 1]."""
        return self.components.vae.encode(images.to(self.device, self.dtype) * 2 - 1).latent_dist.parameters

    @torch.no_grad()
    def posteriors(self, keys: Sequence[Hashable], load: Callable[[list], torch.Tensor]) -> torch.Tensor:
        """Posterior moments of the references ``keys``, from the LRU cache or encoded now.

        Args:
            keys: One key per reference (its index in the training set, say).
            load: ``load(missing_keys)`` -> float ``[n, 3, H, W]`` images in [0, 1], called
                once, only for the keys not in the cache.
        """
        missing = [k for k in dict.fromkeys(keys) if k not in self._posteriors]
        self.posterior_misses += len(missing)
        self.posterior_hits += len(keys) - len(missing)
        fresh = dict(zip(missing, self.encode(load(missing)))) if missing else {}
        moments = torch.stack([fresh[k] if k in fresh else self._posteriors[k] for k in keys])
        for k in keys:
            if k in fresh:
                self._posteriors[k] = fresh[k]
            if k in self._posteriors:
                self._posteriors.move_to_end(k)
        while len(self._posteriors) > self.posterior_cache:
            self._posteriors.popitem(last=False)
        return moments

    def start_translations(self, moments: torch.Tensor, prompts: Sequence[str], strengths: Sequence[float],
                           seeds: Sequence[int], tags: Sequence) -> list[Trajectory]:
        """Trajectories that SDEdit each posterior toward its prompt at its strength.

        Args:
            moments: Posterior moments ``[B, 2C, h, w]`` (``encode``, ``posteriors``).
            prompts: One prompt per sample.
            strengths: One strength in ``(0, 1]`` per sample, as Python floats (see
                ``denoising_steps``); they may differ.
            seeds: One seed per sample (its posterior sample, then its noise).
            tags: One tag per sample, handed back by ``decode``.
        """
        c = self.components
        self._check(len(moments), prompts, strengths, seeds, tags)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (1, *mean.shape[1:])
        eps = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        latents = (mean + std * eps) * c.vae.config.scaling_factor
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        states = self.embed(prompts)
        starts = [self.steps - denoising_steps(self.steps, s) for s in strengths]
        trajectories = []
        for first in sorted(set(starts)):
            rows = [i for i, start in enumerate(starts) if start == first]
            scheduler, index = self._scheduler(first)
            t = scheduler.timesteps[index:index + 1].repeat(len(rows))
            trajectories.append(Trajectory([tags[i] for i in rows], scheduler, index,
                                           scheduler.add_noise(latents[rows], noise[rows], t), states[rows],
                                           [generators[i] for i in rows]))
        return trajectories

    def start_generations(self, prompts: Sequence[str], seeds: Sequence[int], tags: Sequence, *, height: int,
                          width: int) -> list[Trajectory]:
        """One trajectory of text-to-image samples from pure noise."""
        c = self.components
        self._check(len(prompts), prompts, [1.0] * len(prompts), seeds, tags)
        f = c.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}.")
        shape = (1, c.unet.config.in_channels, height // f, width // f)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        scheduler, index = self._scheduler(0)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        return [Trajectory(list(tags), scheduler, index, latents * scheduler.init_noise_sigma, self.embed(prompts),
                           generators)]

    @torch.no_grad()
    def step(self, trajectories: Sequence[Trajectory]) -> None:
        """Advance every unfinished trajectory by one step: one U-Net call over all of them (two with
        DeepCache when some refresh their deep features and some reuse them)."""
        active = [t for t in trajectories if not t.done]
        refresh = [t for t in active if self._unet is None or t.taken % self.deep_cache == 0]
        reuse = [t for t in active if t not in refresh]
        for part in (refresh, reuse):
            if part:
                self._step(part, reuse=part is reuse)

    @torch.no_grad()
    def decode(self, trajectories: Sequence[Trajectory]) -> tuple[list, torch.Tensor]:
        """``(tags, images)`` of finished trajectories: float32 ``[n, 3, H, W]`` in ``[0, 1]`` on the CPU."""
        if not all(t.done for t in trajectories):
            raise ValueError("decode() needs finished trajectories; call step() until each is done.")
        c = self.components
        latents = torch.cat([t.latents for t in trajectories])
        images = c.vae.decode(latents / c.vae.config.scaling_factor, return_dict=False)[0]
        return [tag for t in trajectories for tag in t.tags], (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    def translate(self, images: torch.Tensor, prompts: Sequence[str], strengths: Sequence[float],
                  seeds: Sequence[int]) -> torch.Tensor:
        """SDEdit a batch (``start_translations`` on float ``[B, 3, H, W]`` images in ``[0, 1]``,
        ``H`` and ``W`` multiples of 8), run to the end; float32 ``[B, 3, H, W]`` on the CPU."""
        rows = range(len(images))
        self._check(len(images), prompts, strengths, seeds, rows)
        return self._run(self.start_translations(self.encode(images), prompts, strengths, seeds, rows))

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, height: int, width: int) -> torch.Tensor:
        """Text-to-image; returns float32 ``[B, 3, height, width]`` in ``[0, 1]`` on the CPU."""
        return self._run(self.start_generations(prompts, seeds, range(len(prompts)), height=height, width=width))

    def _run(self, trajectories: list[Trajectory]) -> torch.Tensor:
        while not all(t.done for t in trajectories):
            self.step(trajectories)
        rows, images = self.decode(trajectories)
        return images[torch.argsort(torch.tensor(rows))]

    def _check(self, count: int, prompts, strengths, seeds, tags) -> None:
        if not (len(prompts) == len(strengths) == len(seeds) == len(tags) == count):
            raise ValueError(
                f"Need one prompt, strength, seed and tag per sample: got {count} samples, {len(prompts)} prompts, "
                f"{len(strengths)} strengths, {len(seeds)} seeds, {len(tags)} tags."
            )
        if any(not 0 < float(s) <= 1 for s in strengths):
            raise ValueError(f"strengths must lie in (0, 1], got {list(strengths)}.")
        check_steps(self.steps, strengths)

    def _scheduler(self, first_step: int):
        """A fresh scheduler positioned at ``first_step`` of the schedule, as diffusers' img2img positions it."""
        scheduler = copy.deepcopy(self.components.scheduler)
        scheduler.set_timesteps(self.steps, device=self.device)
        index = first_step * scheduler.order
        if hasattr(scheduler, "set_begin_index"):  # stateless ones (DDIM) step from the timestep alone
            scheduler.set_begin_index(index)
        return scheduler, index

    def _step(self, trajectories: list[Trajectory], *, reuse: bool) -> None:
        cfg = self.guidance > 1
        latents = torch.cat([t.scheduler.scale_model_input(t.latents, t.timestep) for t in trajectories])
        states = torch.cat([t.states for t in trajectories])
        timesteps = torch.cat([t.timestep.repeat(len(t)) for t in trajectories])
        if cfg:
            latents = torch.cat([latents, latents])
            states = torch.cat([self.embed([""]).expand(len(states), -1, -1), states])
            timesteps = torch.cat([timesteps, timesteps])
        if self._unet is None:
            noise = self.components.unet(latents, timesteps, encoder_hidden_states=states, return_dict=False)[0]
        elif reuse:
            deep = torch.cat([t.deep for t in trajectories], dim=1).flatten(0, 1)
            noise = self._unet.shallow(latents, timesteps, states, deep)
        else:
            noise, deep = self._unet.full(latents, timesteps, states)
            for t, part in zip(trajectories, deep.unflatten(0, (1 + cfg, -1)).split([len(t) for t in trajectories],
                                                                                  dim=1)):
                t.deep = part
        if cfg:
            noise_uncond, noise_text = noise.chunk(2)
            noise = noise_uncond + self.guidance * (noise_text - noise_uncond)
        for t, part in zip(trajectories, noise.split([len(t) for t in trajectories])):
            extra = dict(self._step_kwargs, generator=t.generators) if self._stochastic else self._step_kwargs
            t.latents = t.scheduler.step(part, t.timestep, t.latents, return_dict=False, **extra)[0]
            t.index += 1
            t.taken += 1
