"""SDEdit translation and text-to-image with continuous batching, equal to diffusers' pipelines.

For samples of one strength the result equals diffusers'
``StableDiffusionImg2ImgPipeline`` (``StableDiffusionPipeline`` for text-to-image)
on the same components, settings and per-sample generators: the same posterior
and noise draws, the same DPM-Solver++ steps. What changes is the batching. With
``schedule_in_strength`` (an LCM scheduler) every step lies inside the strength, as in
``LatentConsistencyModelImg2ImgPipeline``.

Every sample lives in a ``Trajectory``: the samples admitted together at the same
first step of the schedule, with their own scheduler state (the solver's history)
and their own position in the schedule. ``Sampler.step`` advances every trajectory
it is given by one step in one U-Net call, each row at its own timestep (the
diffusers U-Net takes a timestep per sample). So samples of different strengths,
and samples admitted at different times, share every U-Net call: a caller keeps
the batch full by admitting new samples as soon as a trajectory finishes
(``onlinemix.generator.worker``), or drains one batch (``translate``, ``generate``).

What is cached: prompt embeddings (the unconditional one included), once per
prompt, plain or weighted (``weighted_tokens``); each reference's VAE posterior, in
a bounded LRU keyed by the caller's reference key (``posteriors``); and, with ``deep_cache=k``, the U-Net's deep
features, recomputed every ``k``-th step of each trajectory (``deep_cache.py``;
an approximation, unlike the others).

It is one module because where a trajectory starts (its scheduler and first step), how
``Sampler.step`` advances it and the checks of strengths against steps are one piece of
arithmetic that must agree with diffusers' pipelines; split, the halves could drift apart.
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


def weighted_tokens(tokenizer, fragments: Sequence[tuple[str, float]]) -> tuple[list[int], list[float]]:
    """Token ids and a weight per token of a prompt given as ``(text, weight)`` fragments.

    The ids are the tokenizer's for the joined text (fragments split at word or punctuation
    boundaries tokenize alone as they do together), padded to ``model_max_length``; every
    token of a fragment carries its weight, the start, end and padding tokens 1. A prompt too
    long for the text encoder loses the end of its first fragment, so the later ones (a label
    after a caption) always fit.
    """
    if not fragments:
        raise ValueError("A weighted prompt needs at least one (text, weight) fragment.")
    for text, weight in fragments:
        if not weight > 0:
            raise ValueError(f"Prompt weights must be > 0, got {weight} for {text!r}.")
    pieces = [tokenizer(text, add_special_tokens=False).input_ids for text, _ in fragments]
    room = tokenizer.model_max_length - 2 - sum(len(p) for p in pieces[1:])
    if room < 0:
        raise ValueError(f"The fragments after the first of {[t for t, _ in fragments]} take "
                         f"{sum(len(p) for p in pieces[1:])} tokens; the text encoder reads "
                         f"{tokenizer.model_max_length - 2}.")
    pieces[0] = pieces[0][:room]
    ids = [tokenizer.bos_token_id] + [i for piece in pieces for i in piece] + [tokenizer.eos_token_id]
    weights = [1.0] + [float(w) for piece, (_, w) in zip(pieces, fragments) for _ in piece] + [1.0]
    padding = tokenizer.model_max_length - len(ids)
    return ids + [tokenizer.pad_token_id] * padding, weights + [1.0] * padding


def check_steps(steps: int, strengths) -> None:
    """Every strength must run at least one denoising step (``denoising_steps``)."""
    for strength in strengths:
        if denoising_steps(steps, strength) < 1:
            raise ValueError(
                f"Strength {float(strength)} with {steps} steps runs no denoising step "
                f"(int({steps}·{float(strength)}) = 0); use at least {int(np.ceil(1 / float(strength)))} steps "
                "or a higher strength."
            )


def check_steps_in_strength(steps: int, strengths, grid: int) -> None:
    """With every step inside the strength (``schedule_in_strength``), a strength's share of LCM's ``grid``
    points, ``int(grid·s)``, must hold all ``steps``."""
    for strength in strengths:
        if int(grid * float(strength)) < steps:
            low = min(float(s) for s in strengths)
            raise ValueError(
                f"Strength {float(strength)} holds {int(grid * float(strength))} of the {grid}-point LCM grid, fewer "
                f"than the {steps} steps asked; use at most {int(grid * low)} steps, or strengths of at least "
                f"{steps / grid:g}."
            )


@dataclass
class Trajectory:
    """Samples admitted together at one first step: they share a scheduler state and a position.

    Attributes:
        tags: The caller's tag per sample (a request, a row index), handed back when done.
        scheduler: Their DPM-Solver++ state.
        index: Position in ``scheduler.timesteps`` of the next step.
        latents: ``[n, C, h, w]``.
        states: Conditioning ``[n, L, D]`` (prompt embeddings: ``L = 77`` for CLIP).
        unconditional: The unconditional input of guidance ``[n, L, D]`` (the empty prompt's embedding by default).
        pooled: The pooled text conditioning ``[n, P]`` of SDXL, SD 3 and FLUX; None for Stable Diffusion.
        unconditional_pooled: Its unconditional counterpart ``[n, P]``, or None.
        guidance: Classifier-free guidance scale per sample ``[n]``.
        generators: The samples' generators, for schedulers that draw noise while stepping (LCM, TCD).
        taken: Steps taken so far (DeepCache refreshes the deep features when ``taken % k == 0``).
        deep: Cached deep features ``[copies, n, ...]`` (two copies under guidance: unconditional, conditional).
    """

    tags: list
    scheduler: object
    index: int
    latents: torch.Tensor
    states: torch.Tensor
    unconditional: torch.Tensor
    guidance: torch.Tensor
    generators: list
    pooled: Optional[torch.Tensor] = None
    unconditional_pooled: Optional[torch.Tensor] = None
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

    @property
    def guided(self) -> bool:
        """Whether a sample needs classifier-free guidance (a scale above 1)."""
        return bool((self.guidance > 1).any())


class Sampler:
    """Translate or generate with one set of components.

    Args:
        components: The generator (see ``components.py``).
        steps: Denoising steps of the full schedule (img2img runs ``int(steps·s)`` of them).
        guidance: Classifier-free guidance scale; 1 turns guidance off.
        deep_cache: Recompute the U-Net's deep features every ``deep_cache``-th step of a
            trajectory and reuse them in between (DeepCache); 1 (default): never reuse, exact.
        posterior_cache: How many references' VAE posteriors ``posteriors`` keeps (LRU).
        schedule_in_strength: Fit the whole ``steps``-step schedule inside each strength: an SDEdit
            of strength ``s`` starts at ``s·T`` and runs every step (``LCMScheduler.set_timesteps(
            strength=s)``, diffusers' ``LatentConsistencyModelImg2ImgPipeline``). False: it runs the
            last ``int(steps·s)`` steps of the full schedule (``StableDiffusionImg2ImgPipeline``),
            coarse at few steps.
    """

    def __init__(self, components: Components, *, steps: int = 25, guidance: float = 7.5, deep_cache: int = 1,
                 posterior_cache: int = 0, schedule_in_strength: bool = False):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        if guidance < 1:
            raise ValueError(f"guidance must be >= 1 (1 turns classifier-free guidance off), got {guidance}.")
        if deep_cache < 1:
            raise ValueError(f"deep_cache must be >= 1 (1 recomputes every step), got {deep_cache}.")
        if posterior_cache < 0:
            raise ValueError(f"posterior_cache must be >= 0, got {posterior_cache}.")
        family = components.kind
        if deep_cache > 1 and family.name != "sd":
            raise ValueError(f"deep_cache needs a Stable Diffusion 1.x/2.x U-Net; a {family.name} generator has none "
                             "with DeepCache's shallow branch (use deep_cache=1).")
        if schedule_in_strength and "strength" not in inspect.signature(components.scheduler.set_timesteps).parameters:
            raise ValueError(f"schedule_in_strength needs a scheduler that places its schedule inside a strength "
                             f"(LCMScheduler); {type(components.scheduler).__name__} cannot.")
        self.components = components
        self.family = family
        self.schedule_in_strength = schedule_in_strength
        # diffusers finds a model's dtype by walking its parameters (ms each): read once, so move
        # the components before building a sampler.
        self.device, self.dtype = components.device, components.dtype
        self.vae_dtype = components.vae.dtype  # SDXL's VAE stays float32 under fp16 (``load_components``)
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
        self._embeddings: dict = {}
        self._default_unconditional = None  # the family's default, encoded on first use
        self._posteriors: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.posterior_hits = 0
        self.posterior_misses = 0

    @torch.no_grad()
    def embed(self, prompts: Sequence) -> torch.Tensor:
        """Text-encoder states ``[B, L, D]`` of ``prompts``, cached per prompt (``embed_pooled`` adds the pooled part)."""
        return self.embed_pooled(prompts)[0]

    @torch.no_grad()
    def embed_pooled(self, prompts: Sequence) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """States ``[B, L, D]`` and pooled conditioning ``[B, P]`` (None for Stable Diffusion) of ``prompts``,
        encoded as the family's pipeline encodes them and cached per prompt.

        A Stable Diffusion prompt may also be a tuple of ``(text, weight)`` fragments (``weighted_tokens``):
        each fragment's output states are multiplied by its weight. The weights scale the outputs, not the
        token embeddings, because the U-Net reads the outputs: a weight scales exactly that fragment's keys
        and values in every cross-attention layer, where on the input side the encoder's final LayerNorm
        would normalise most of the scale away again.
        """
        for prompt in dict.fromkeys(prompts):
            # Each prompt is encoded alone, so its cached bits never depend on the prompts that happened to
            # arrive with it (a GEMM need not give a row the same bits in batches of different sizes).
            if prompt not in self._embeddings:
                self.family.check_prompt(prompt)
                states, pooled = self.family.encode_prompt(self.components, prompt)
                self._embeddings[prompt] = (states.to(self.dtype), None if pooled is None else pooled.to(self.dtype))
        states = torch.stack([self._embeddings[p][0] for p in prompts])
        pooled = [self._embeddings[p][1] for p in prompts]
        return states, None if pooled[0] is None else torch.stack(pooled)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE posterior moments ``[B, 2C, h, w]`` (mean, log-variance) of float ``[B, 3, H, W]`` images in [0, 1]."""
        return self.components.vae.encode(images.to(self.device, self.vae_dtype) * 2 - 1).latent_dist.parameters

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

    def start_translations(self, moments: torch.Tensor, conditions, strengths: Sequence[float],
                           seeds: Sequence[int], tags: Sequence, *, guidance: Optional[Sequence[float]] = None,
                           unconditional: Optional[torch.Tensor] = None) -> list[Trajectory]:
        """Trajectories that SDEdit each posterior toward its condition at its strength.

        Args:
            moments: Posterior moments ``[B, 2C, h, w]`` (``encode``, ``posteriors``).
            conditions: One prompt per sample (a string, or weighted fragments: ``embed_pooled``), or
                conditioning tensors ``[B, L, D]`` for Stable Diffusion (``D`` the U-Net's cross-attention
                width; prompt embeddings have ``L = 77``).
            strengths: One strength in ``(0, 1]`` per sample, as Python floats (see
                ``denoising_steps``); they may differ.
            seeds: One seed per sample (its posterior sample, then its noise).
            tags: One tag per sample, handed back by ``decode``.
            guidance: One guidance scale (>= 1) per sample, None for the sampler's; default the sampler's.
            unconditional: Guidance's unconditional input, ``[L, D]`` for all samples or
                ``[B, L, D]``; default the empty prompt's embedding.
        """
        c = self.components
        states, unconditional, guidance, pooled = self._conditioning(len(moments), conditions, strengths, seeds, tags,
                                                                     guidance, unconditional)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (1, *mean.shape[1:])
        eps = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device, mean.dtype)
        latents = self.family.to_latents(c, mean + std * eps).to(self.dtype)
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        size = tuple(latents.shape[-2:])
        # Samples that start together share a scheduler: one per first step, or per strength.
        starts = [float(s) if self.schedule_in_strength else self.family.first_step(self.steps, s) for s in strengths]
        trajectories = []
        for first in sorted(set(starts)):
            rows = [i for i, start in enumerate(starts) if start == first]
            scheduler, index = self._scheduler_at(first) if self.schedule_in_strength else self._scheduler(first, size)
            t = scheduler.timesteps[index:index + 1].repeat(len(rows))
            trajectories.append(Trajectory(
                [tags[i] for i in rows], scheduler, index, self.family.noise(scheduler, latents[rows], noise[rows], t),
                states[rows], unconditional[0][rows], guidance[rows], [generators[i] for i in rows],
                pooled=None if pooled is None else pooled[rows],
                unconditional_pooled=None if unconditional[1] is None else unconditional[1][rows]))
        return trajectories

    def start_generations(self, conditions, seeds: Sequence[int], tags: Sequence, *, height: int, width: int,
                          guidance: Optional[Sequence[float]] = None,
                          unconditional: Optional[torch.Tensor] = None) -> list[Trajectory]:
        """One trajectory of text-to-image samples from pure noise (arguments as ``start_translations``)."""
        c = self.components
        states, unconditional, guidance, pooled = self._conditioning(len(seeds), conditions, [1.0] * len(seeds), seeds,
                                                                     tags, guidance, unconditional)
        f = self.family.size_multiple(c)
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this {self.family.name} generator, got "
                             f"{height}x{width}.")
        size = (height // c.vae_scale_factor, width // c.vae_scale_factor)
        shape = (1, self.family.latent_channels(c), *size)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        scheduler, index = self._scheduler(0, size)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        # Flow schedulers start at pure noise, σ = 1; DDPM-type ones scale it by their first σ (Euler: > 1).
        scale = 1.0 if self.family.flow else scheduler.init_noise_sigma
        return [Trajectory(list(tags), scheduler, index, latents * scale, states, unconditional[0], guidance,
                           generators, pooled=pooled, unconditional_pooled=unconditional[1])]

    @torch.no_grad()
    def step(self, trajectories: Sequence[Trajectory]) -> None:
        """Advance every unfinished trajectory by one step: one U-Net call over all of them (two with
        DeepCache when some refresh their deep features and some reuse them). The call runs the
        unconditional rows too when any sample in it is guided."""
        active = [t for t in trajectories if not t.done]
        copies = 2 if self.family.classifier_free and any(t.guided for t in active) else 1
        if len({tuple(t.states.shape[1:]) for t in active}) > 1:
            raise ValueError("Samples stepped together need conditioning of one length: got "
                             f"{sorted({tuple(t.states.shape[1:]) for t in active})}.")

        def refreshes(t: Trajectory) -> bool:  # a trajectory without the copies this call needs refreshes too
            return self._unet is None or t.taken % self.deep_cache == 0 or t.deep is None or len(t.deep) < copies

        refresh = [t for t in active if refreshes(t)]
        reuse = [t for t in active if not refreshes(t)]
        for part in (refresh, reuse):
            if part:
                self._step(part, copies=copies, reuse=part is reuse)

    @torch.no_grad()
    def decode(self, trajectories: Sequence[Trajectory]) -> tuple[list, torch.Tensor]:
        """``(tags, images)`` of finished trajectories: float32 ``[n, 3, H, W]`` in ``[0, 1]`` on the CPU."""
        if not all(t.done for t in trajectories):
            raise ValueError("decode() needs finished trajectories; call step() until each is done.")
        c = self.components
        latents = torch.cat([t.latents for t in trajectories])
        images = c.vae.decode(self.family.from_latents(c, latents).to(self.vae_dtype), return_dict=False)[0]
        return [tag for t in trajectories for tag in t.tags], (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    def translate(self, images: torch.Tensor, conditions, strengths: Sequence[float], seeds: Sequence[int], *,
                  guidance: Optional[Sequence[float]] = None,
                  unconditional: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SDEdit a batch (``start_translations`` on float ``[B, 3, H, W]`` images in ``[0, 1]``,
        ``H`` and ``W`` multiples of the family's ``size_multiple``), run to the end; float32 ``[B, 3, H, W]`` on
        the CPU."""
        rows = range(len(images))
        self._conditioning(len(images), conditions, strengths, seeds, rows, guidance, unconditional)  # before encoding
        return self._run(self.start_translations(self.encode(images), conditions, strengths, seeds, rows,
                                                 guidance=guidance, unconditional=unconditional))

    def generate(self, conditions, seeds: Sequence[int], *, height: int, width: int,
                 guidance: Optional[Sequence[float]] = None,
                 unconditional: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text-to-image; returns float32 ``[B, 3, height, width]`` in ``[0, 1]`` on the CPU."""
        return self._run(self.start_generations(conditions, seeds, range(len(seeds)), height=height, width=width,
                                                guidance=guidance, unconditional=unconditional))

    def _run(self, trajectories: list[Trajectory]) -> torch.Tensor:
        while not all(t.done for t in trajectories):
            self.step(trajectories)
        rows, images = self.decode(trajectories)
        return images[torch.argsort(torch.tensor(rows))]

    def _conditioning(self, count: int, conditions, strengths, seeds, tags, guidance, unconditional):
        """Check one condition, strength, seed, tag and guidance scale per sample; return the conditioning
        ``[B, L, D]``, the unconditional input ``([B, L, D], [B, P] or None)``, the scales ``[B]`` and the pooled
        conditioning ``[B, P]`` (None for Stable Diffusion)."""
        if not (len(conditions) == len(strengths) == len(seeds) == len(tags) == count) or (
                guidance is not None and len(guidance) != count):
            raise ValueError(
                f"Need one condition (prompt or tensor), strength, seed, tag and guidance scale per sample: got {count} "
                f"samples, {len(conditions)} conditions, {len(strengths)} strengths, {len(seeds)} seeds, {len(tags)} "
                f"tags{'' if guidance is None else f', {len(guidance)} guidance scales'}."
            )
        if any(not 0 < float(s) <= 1 for s in strengths):
            raise ValueError(f"strengths must lie in (0, 1], got {list(strengths)}.")
        if not self.schedule_in_strength and not self.family.flow:  # a flow schedule runs >= 1 step at any strength
            check_steps(self.steps, strengths)
        scales = torch.tensor([self.guidance if g is None else float(g) for g in guidance or [None] * count])
        if (scales < 1).any():
            raise ValueError(f"guidance scales must be >= 1 (1 turns guidance off), got {scales.tolist()}.")
        if self.family.name != "sd" and (isinstance(conditions, torch.Tensor) or unconditional is not None):
            raise ValueError(f"Conditioning tensors (learned conditions, an own unconditional input) need a Stable "
                             f"Diffusion 1.x/2.x generator; the {self.family.name} family takes prompts.")
        pooled = None
        if isinstance(conditions, torch.Tensor):
            width = self.components.unet.config.cross_attention_dim
            if conditions.dim() != 3 or conditions.shape[-1] != width:
                raise ValueError(f"Conditioning tensors must be [B, L, {width}] (the U-Net's cross-attention width), "
                                 f"got {list(conditions.shape)}.")
            states = conditions.to(self.device, self.dtype)
        else:
            states, pooled = self.embed_pooled(conditions)
        return states, self._unconditional(count, states, unconditional), scales, pooled

    def _unconditional(self, count: int, states: torch.Tensor, unconditional: Optional[torch.Tensor]):
        """Guidance's unconditional input per sample: the caller's ``[L, D]`` or ``[B, L, D]``, else the family's."""
        if unconditional is None:
            if self._default_unconditional is None:
                states_u, pooled_u = self.family.unconditional(self.components)
                self._default_unconditional = (states_u.to(self.dtype),
                                               None if pooled_u is None else pooled_u.to(self.dtype))
            unconditional, pooled = self._default_unconditional
            pooled = None if pooled is None else pooled.expand(count, -1)
        else:
            unconditional, pooled = unconditional.to(self.device, self.dtype), None
        if unconditional.dim() == 2:
            unconditional = unconditional.expand(count, -1, -1)
        if unconditional.shape != states.shape:
            raise ValueError(f"The unconditional input must be [L, D] or [B, L, D] like the conditioning "
                             f"{list(states.shape)}, got {list(unconditional.shape)}.")
        return unconditional, pooled

    def _scheduler(self, first_step: int, latent_size: tuple[int, int]):
        """A fresh scheduler positioned at ``first_step`` of the schedule, as diffusers' img2img positions it."""
        scheduler = copy.deepcopy(self.components.scheduler)
        self.family.set_timesteps(self.components, scheduler, self.steps, latent_size)
        index = first_step * scheduler.order
        if hasattr(scheduler, "set_begin_index"):  # stateless ones (DDIM) step from the timestep alone
            scheduler.set_begin_index(index)
        return scheduler, index

    def _scheduler_at(self, strength: float):
        """A fresh scheduler whose whole schedule lies inside ``strength`` (``schedule_in_strength``), at its start."""
        scheduler = copy.deepcopy(self.components.scheduler)
        scheduler.set_timesteps(self.steps, device=self.device, strength=strength)
        scheduler.set_begin_index(0)
        return scheduler, 0

    def _step(self, trajectories: list[Trajectory], *, copies: int, reuse: bool) -> None:
        # Flow-matching schedulers have no input scaling; DDPM-type ones may (Euler's 1/sqrt(σ² + 1)).
        latents = torch.cat([t.scheduler.scale_model_input(t.latents, t.timestep)
                             if hasattr(t.scheduler, "scale_model_input") else t.latents for t in trajectories])
        states = torch.cat([t.states for t in trajectories])
        pooled = None if trajectories[0].pooled is None else torch.cat([t.pooled for t in trajectories])
        timesteps = torch.cat([t.timestep.repeat(len(t)) for t in trajectories])
        guidance = torch.cat([t.guidance for t in trajectories])
        if copies == 2:
            latents = torch.cat([latents, latents])
            states = torch.cat([torch.cat([t.unconditional for t in trajectories]), states])
            if pooled is not None:
                pooled = torch.cat([torch.cat([t.unconditional_pooled for t in trajectories]), pooled])
            timesteps = torch.cat([timesteps, timesteps])
        if self._unet is None:
            noise = self.family.predict(self.components, latents, timesteps, states, pooled,
                                        torch.cat([guidance] * copies))
        elif reuse:
            deep = torch.cat([t.deep[-copies:] for t in trajectories], dim=1).flatten(0, 1)  # [-1:]: the conditional
            noise = self._unet.shallow(latents, timesteps, states, deep)
        else:
            noise, deep = self._unet.full(latents, timesteps, states)
            for t, part in zip(trajectories, deep.unflatten(0, (copies, -1)).split([len(t) for t in trajectories],
                                                                               dim=1)):
                t.deep = part
        if copies == 2:
            noise_uncond, noise_text = noise.chunk(2)
            scale = guidance.to(noise.device, noise.dtype).view(-1, 1, 1, 1)
            noise = noise_uncond + scale * (noise_text - noise_uncond)
        for t, part in zip(trajectories, noise.split([len(t) for t in trajectories])):
            extra = dict(self._step_kwargs, generator=t.generators) if self._stochastic else self._step_kwargs
            t.latents = t.scheduler.step(part, t.timestep, t.latents, return_dict=False, **extra)[0]
            t.index += 1
            t.taken += 1
