"""What differs between model families, behind one small interface the sampler drives.

A ``Family`` says how a prompt becomes conditioning (a sequence of states, and a pooled vector
for SDXL, SD 3.x and FLUX.1), how VAE latents are scaled, which denoiser is called and how, how
a strength maps to the first step of a schedule, and how a clean latent is noised to it. The
sampler's continuous batching, caches, guidance and the worker's planning never ask which family
they drive. Each family equals its diffusers img2img and text-to-image pipelines; tests pin every
family's prompt encoding and sampling to those pipelines.

Families and their pipelines (``FAMILIES``; ``family_of`` reads a ``model_index.json``):

- ``sd``: Stable Diffusion 1.x/2.x, a U-Net on ε or v, DDPM noise (``StableDiffusionImg2ImgPipeline``).
- ``sdxl``: SDXL base, two CLIP encoders, a U-Net with pooled text and size conditioning
  (``StableDiffusionXLImg2ImgPipeline``).
- ``sd3``: Stable Diffusion 3.x, an MM-DiT on flow matching, CLIP-L/G and an optional T5
  (``StableDiffusion3Img2ImgPipeline``).
- ``flux``: FLUX.1 dev and schnell, a flow-matching transformer on packed latents, CLIP-L and T5,
  guidance distilled into an embedding (dev) or absent (schnell), never classifier-free
  (``FluxImg2ImgPipeline``).

The encoders are written here, not borrowed from the pipelines, so personalisation can train through them
(gradients, wrapped modules); tests pin each to its pipeline's ``encode_prompt``.

To add a family: subclass ``Family``, override what differs, add it to ``FAMILIES`` and its
parts to ``components.load_components`` (see ARCHITECTURE.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from .sampler import denoising_steps, weighted_tokens


class Family:
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, a U-Net, DDPM noise; the base of the others.

    Attributes:
        name: What ``--gen-model`` folders of this family are called in configs.
        title: What they are called in messages.
        pipelines: diffusers' text-to-image and img2img pipeline class names, in that order.
        parts: The model folder's sub-folders the family loads (``None`` in ``model_index.json``
            is allowed for ``optional_parts``).
        classifier_free: Whether ``guidance`` > 1 runs an unconditional copy (False: the denoiser
            embeds the guidance scale itself, FLUX.1-dev, or ignores it, FLUX.1-schnell).
        flow: Whether the denoiser predicts a flow-matching velocity (sampled with
            ``FlowMatchEulerDiscreteScheduler``) rather than DDPM noise.
        lora_targets: The denoiser's attention projections personalisation puts LoRA on (peft's
            ``target_modules``), those of diffusers' DreamBooth LoRA scripts for the family.
        token_encoders: The CLIP text encoders that learn class tokens; each reads the tokenizer of the
            same suffix (``text_encoder_2``: ``tokenizer_2``).
        timestep_sampling: How personalisation draws its training timesteps (``training_noise``): uniformly,
            or logit-normal on the flow schedule (SD 3).
        training_guidance: The guidance scale a guidance-embedding denoiser (FLUX.1-dev) is trained under.
    """

    name = "sd"
    title = "Stable Diffusion"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    parts = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
    optional_parts: tuple = ()
    classifier_free = True
    flow = False
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    token_encoders = ("text_encoder",)
    timestep_sampling = "uniform"
    training_guidance = 1.0

    # Conditioning.
    def encode(self, components, prompts) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(states [B, L, D], pooled [B, P] or None)`` of plain-text ``prompts``, as the family's pipeline
        encodes them; personalisation trains through it, so it runs with gradients when asked."""
        return components.text_encoder(clip_ids(components.tokenizer, prompts, components.device))[0], None

    def encode_prompt(self, components, prompt) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(states [L, D], pooled [P] or None)`` of one prompt (``encode`` of one).

        Stable Diffusion's prompt may also be ``(text, weight)`` fragments (``sampler.weighted_tokens``): the
        encoder reads the joined text and each fragment's output states are multiplied by its weight.
        """
        if isinstance(prompt, str):
            states, pooled = self.encode(components, [prompt])
            return states[0], None if pooled is None else pooled[0]
        device = components.device
        ids, weights = weighted_tokens(components.tokenizer, prompt)
        states = components.text_encoder(torch.tensor([ids], device=device))[0][0]
        return states * torch.tensor(weights, device=device, dtype=states.dtype)[:, None], None

    def unconditional(self, components) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Guidance's unconditional input when the caller gives none: the empty prompt's encoding."""
        return self.encode_prompt(components, "")

    def check_prompt(self, prompt) -> None:
        """Weighted fragments are Stable Diffusion's alone: the other families' encoders are their pipelines'."""
        if not isinstance(prompt, str) and self.name != "sd":
            raise ValueError(f"Weighted prompts (text, weight fragments) need a Stable Diffusion 1.x/2.x generator; "
                             f"the {self.name} family takes plain strings.")

    # Latents.
    def to_latents(self, components, sample: torch.Tensor) -> torch.Tensor:
        """A VAE posterior sample as the denoiser's latents."""
        return sample * components.vae.config.scaling_factor

    def from_latents(self, components, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents as the VAE decoder's input."""
        return latents / components.vae.config.scaling_factor

    def latent_channels(self, components) -> int:
        return components.denoiser.config.in_channels

    def size_multiple(self, components) -> int:
        """What image heights and widths must be multiples of: the VAE's downsampling (and the transformer's patch)."""
        return components.vae_scale_factor

    # The schedule.
    def first_step(self, steps: int, strength: float) -> int:
        """Where an SDEdit of ``strength`` starts in a ``steps``-step schedule (diffusers' ``get_timesteps``):
        after ``steps - min(int(steps·s), steps)`` steps, ``int`` on the Python float (see ``denoising_steps``)."""
        return steps - denoising_steps(steps, strength)

    def set_timesteps(self, components, scheduler, steps: int, latent_size: tuple[int, int]) -> None:
        """``scheduler``'s ``steps``-step schedule for latents of ``latent_size`` ``(h, w)``, as the pipelines set it."""
        scheduler.set_timesteps(steps, device=components.device)

    def noise(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Clean latents noised to ``timesteps``, the schedule's first step."""
        return scheduler.add_noise(latents, noise, timesteps)

    # The denoiser.
    def predict(self, components, latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                pooled: Optional[torch.Tensor], guidance: torch.Tensor) -> torch.Tensor:
        """The denoiser's output on ``[B, C, h, w]`` latents, one timestep, conditioning and guidance scale per row."""
        return components.unet(latents, timesteps, encoder_hidden_states=states, return_dict=False)[0]


class StableDiffusionXL(Family):
    """SDXL base: CLIP-L's and OpenCLIP-G's penultimate states side by side, OpenCLIP-G's pooled
    projection and the image size as the U-Net's added conditioning (``text_embeds``, ``time_ids``).

    The unconditional input of an empty negative prompt is zeros when the model says
    ``force_zeros_for_empty_prompt`` (SDXL base does), as in its pipelines. The refiner (aesthetic
    score conditioning) is not supported.
    """

    name = "sdxl"
    title = "SDXL"
    pipelines = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "unet", "vae", "scheduler")
    token_encoders = ("text_encoder", "text_encoder_2")

    def encode(self, components, prompts):
        pairs = ((components.tokenizer, components.text_encoder), (components.tokenizer_2, components.text_encoder_2))
        outputs = [encoder(clip_ids(tokenizer, prompts, components.device), output_hidden_states=True)
                   for tokenizer, encoder in pairs]
        states = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)  # penultimate layers, side by side
        return states.to(components.text_encoder_2.dtype), outputs[1].text_embeds

    def unconditional(self, components):
        states, pooled = self.encode_prompt(components, "")
        if components.pipeline_config.get("force_zeros_for_empty_prompt", True):
            return torch.zeros_like(states), torch.zeros_like(pooled)
        return states, pooled

    def predict(self, components, latents, timesteps, states, pooled, guidance):
        # time_ids: original size, crop top-left, target size; the pipelines' defaults are the image's size, no crop.
        height, width = (n * components.vae_scale_factor for n in latents.shape[-2:])
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=latents.device, dtype=states.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(latents), -1)}
        return components.unet(latents, timesteps, encoder_hidden_states=states, added_cond_kwargs=added,
                               return_dict=False)[0]


class FlowFamily(Family):
    """What SD 3.x and FLUX.1 share: a flow-matching transformer (velocity), ``x_t = (1 - σ)·x0 + σ·ε``,
    a VAE with a shift, and the flow pipelines' strength arithmetic."""

    flow = True
    # Both blocks' streams: the image's (to_*) and the text's (add_*_proj, to_add_out); FLUX's single blocks
    # have to_q/k/v only.
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out")

    def to_latents(self, components, sample):
        return (sample - components.vae.config.shift_factor) * components.vae.config.scaling_factor

    def from_latents(self, components, latents):
        return latents / components.vae.config.scaling_factor + components.vae.config.shift_factor

    def first_step(self, steps, strength):
        """The flow pipelines' ``get_timesteps``: ``int(max(steps - steps·s, 0))``, no rounding of ``steps·s``
        first, so a strength runs one step more than in the U-Net pipelines for some pairs (25 at 0.7: 18)."""
        return int(max(steps - steps * float(strength), 0))

    def noise(self, scheduler, latents, noise, timesteps):
        return scheduler.scale_noise(latents, timesteps, noise)

    def shift(self, scheduler, sequence_length: int) -> dict:
        """The resolution-dependent shift ``mu`` of a dynamically shifted schedule (FLUX.1, SD 3.5 turbo-like)."""
        if not scheduler.config.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        return {"mu": calculate_shift(sequence_length, config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", self.max_shift))}


class StableDiffusion3(FlowFamily):
    """SD 3.x: CLIP-L's and CLIP-G's penultimate states beside T5's (zeros without T5), their pooled
    projections joined; classifier-free guidance on the empty prompt, as its pipelines do."""

    name = "sd3"
    title = "Stable Diffusion 3"
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3",
             "transformer", "vae", "scheduler")
    optional_parts = ("tokenizer_3", "text_encoder_3")
    token_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L and CLIP-G; T5 reads the token as sub-words
    timestep_sampling = "logit_normal"  # diffusers' SD 3 scripts' default, the SD 3 paper's
    max_shift = 1.16  # the SD 3 pipelines' default for a dynamically shifted schedule

    t5_length = 256  # the SD 3 pipelines' max_sequence_length

    def encode(self, components, prompts):
        device = components.device
        outputs = [encoder(clip_ids(tokenizer, prompts, device), output_hidden_states=True) for tokenizer, encoder in
                   ((components.tokenizer, components.text_encoder), (components.tokenizer_2, components.text_encoder_2))]
        clip = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
        pooled = torch.cat([out.text_embeds for out in outputs], dim=-1)
        if components.text_encoder_3 is None:  # SD 3 without T5 reads zeros in its place
            t5 = torch.zeros(len(prompts), self.t5_length, components.transformer.config.joint_attention_dim,
                             device=device, dtype=clip.dtype)
        else:
            t5 = components.text_encoder_3(t5_ids(components.tokenizer_3, prompts, self.t5_length, device))[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # CLIP's width padded to T5's
        return torch.cat([clip.to(t5.dtype), t5], dim=1), pooled

    def set_timesteps(self, components, scheduler, steps, latent_size):
        patch = components.transformer.config.patch_size
        scheduler.set_timesteps(steps, device=components.device,
                                **self.shift(scheduler, (latent_size[0] // patch) * (latent_size[1] // patch)))

    def size_multiple(self, components):
        return components.vae_scale_factor * components.transformer.config.patch_size

    def predict(self, components, latents, timesteps, states, pooled, guidance):
        return components.transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=states,
                                      pooled_projections=pooled, return_dict=False)[0]


class Flux(FlowFamily):
    """FLUX.1: T5's states as the sequence and CLIP-L's pooled output, latents packed 2x2 into tokens with
    their row and column as position ids, a schedule shifted by the image's token count. dev embeds the
    guidance scale (``guidance_embeds``), schnell has none; neither runs classifier-free guidance.

    The sampler keeps latents unpacked ``[B, C, h, w]``: the Euler step is elementwise, so packing only
    around the transformer call gives the pipelines' values exactly.
    """

    name = "flux"
    title = "FLUX.1"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline")
    parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae", "scheduler")
    classifier_free = False
    max_shift = 1.15
    # CLIP-L gives FLUX only its pooled vector (the modulation); T5, which writes the sequence every block
    # attends to, reads a class token as sub-words. So the tokens carry a global hint and the LoRA the rest.
    token_encoders = ("text_encoder",)
    training_guidance = 3.5  # diffusers' FLUX DreamBooth scripts' --guidance_scale

    t5_length = 512  # the FLUX pipelines' max_sequence_length

    def encode(self, components, prompts):
        device = components.device
        pooled = components.text_encoder(clip_ids(components.tokenizer, prompts, device)).pooler_output
        states = components.text_encoder_2(t5_ids(components.tokenizer_2, prompts, self.t5_length, device))[0]
        return states, pooled.to(components.text_encoder.dtype)

    def latent_channels(self, components):
        return components.transformer.config.in_channels // 4

    def size_multiple(self, components):
        return components.vae_scale_factor * 2  # latents are packed 2x2

    def set_timesteps(self, components, scheduler, steps, latent_size):
        import numpy as np

        sigmas = np.linspace(1.0, 1 / steps, steps)  # the FLUX pipelines' schedule, shifted below
        scheduler.set_timesteps(sigmas=sigmas, device=components.device,
                                **self.shift(scheduler, (latent_size[0] // 2) * (latent_size[1] // 2)))

    def predict(self, components, latents, timesteps, states, pooled, guidance):
        b, c, h, w = latents.shape
        packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        positions = torch.zeros(h // 2, w // 2, 3, device=latents.device)
        positions[..., 1] += torch.arange(h // 2, device=latents.device)[:, None]
        positions[..., 2] += torch.arange(w // 2, device=latents.device)[None, :]
        text_positions = torch.zeros(states.shape[1], 3, device=latents.device, dtype=states.dtype)
        embedded = guidance.to(latents.device, torch.float32) if components.transformer.config.guidance_embeds else None
        velocity = components.transformer(
            hidden_states=packed, timestep=timesteps.to(latents.dtype) / 1000, guidance=embedded,
            pooled_projections=pooled, encoder_hidden_states=states, txt_ids=text_positions,
            img_ids=positions.reshape(-1, 3).to(states.dtype), return_dict=False)[0]
        return velocity.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def clip_ids(tokenizer, prompts, device) -> torch.Tensor:
    """``[B, 77]`` token ids of a CLIP tokenizer, padded and truncated to its length, as every pipeline reads them."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def t5_ids(tokenizer, prompts, length: int, device) -> torch.Tensor:
    """``[B, length]`` token ids of a T5 tokenizer, padded and truncated to the pipeline's ``max_sequence_length``."""
    return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                     return_tensors="pt").input_ids.to(device)


FAMILIES = {family.name: family for family in (Family(), StableDiffusionXL(), StableDiffusion3(), Flux())}
PIPELINE_FAMILIES = {pipeline: family for family in FAMILIES.values() for pipeline in family.pipelines}


def family_of(pipeline_class: str) -> Family:
    """The family of a diffusers pipeline class name (``model_index.json``'s ``_class_name``).

    Raises:
        ValueError: For a pipeline no family supports, listing those that are.
    """
    if pipeline_class not in PIPELINE_FAMILIES:
        raise ValueError(f"onlinemix cannot drive a {pipeline_class!r} model; supported pipelines are "
                         f"{sorted(PIPELINE_FAMILIES)} (families {sorted(FAMILIES)}).")
    return PIPELINE_FAMILIES[pipeline_class]
