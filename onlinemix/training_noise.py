"""The forward process every objective here trains a denoiser or a condition against.

Personalisation (``personalise.py``), Diffusion Inversion (``invert.py``) and the demo
generator's pretraining (``demo_model.py``) all noise clean latents at a random training
timestep and regress the denoiser's output on a target. ``TrainingNoise`` is that one step, on
the base model's DDPM schedule, as diffusers' training scripts do it
(``DDPMScheduler.add_noise``, and ``get_velocity`` for v-prediction). ``FlowTrainingNoise`` is
the flow-matching one (SD 3.x, FLUX.1), as diffusers' DreamBooth scripts for those families
draw it; ``training_noise_of`` picks the one a model trains with.

It is built from the model's scheduler config, whatever scheduler samples: a sampling
scheduler's own ``add_noise`` (DPM-Solver++ before ``set_timesteps``) indexes its sigmas
from the other end and pairs training timestep ``t`` with the noise level of ``999 - t``.

``noise_prediction_error`` measures what each objective lowers, on fixed draws, so tests and
benchmarks compare a condition or a U-Net before and after training at chosen timesteps.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


class NoisedLatents(NamedTuple):
    """One training draw.

    Attributes:
        noisy: ``sqrt(alpha_bar_t)·latents + sqrt(1 - alpha_bar_t)·noise`` (flow: ``(1 - σ)·latents + σ·noise``),
            float32.
        noise: The Gaussian noise drawn.
        timesteps: ``[B]``, each row's training timestep: int64 on a DDPM schedule, float32 on a flow one.
        target: What the denoiser should predict: ``noise`` (epsilon), the velocity (v_prediction), or the
            flow velocity ``noise - latents``.
    """

    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


class TrainingNoise:
    """Noise latents at random training timesteps on the model's DDPM schedule.

    Args:
        scheduler_config: Any scheduler config of the base model (``components.scheduler.config``):
            its betas, number of training timesteps and prediction type are read.
    """

    def __init__(self, scheduler_config):
        from diffusers import DDPMScheduler

        self.schedule = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.schedule.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"The base model's scheduler predicts {self.prediction_type!r}; training here supports "
                             f"{' and '.join(PREDICTION_TYPES)} models (Stable Diffusion 1.x and 2.x).")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.config.num_train_timesteps)

    def __call__(self, latents: torch.Tensor, generator: torch.Generator,
                 timesteps: Optional[torch.Tensor] = None) -> NoisedLatents:
        """Noise ``latents`` (scaled by the VAE's factor), drawing the noise and then, unless given, one
        timestep per row uniformly in ``[0, num_train_timesteps)`` from ``generator`` (on the CPU, so a
        seed gives the same draw on every device)."""
        latents = latents.float()
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        if timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (len(latents),), generator=generator)
        timesteps = timesteps.to(latents.device, torch.int64)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.schedule.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return NoisedLatents(noisy, noise, timesteps, target)


class FlowTrainingNoise:
    """Noise latents on a flow-matching model's training schedule: ``x_σ = (1 - σ)·x0 + σ·ε``, target the
    velocity ``ε - x0`` (so one Euler step of ``-σ·velocity`` lands on ``x0``).

    As diffusers' SD 3 and FLUX DreamBooth scripts draw it: ``u`` in [0, 1) (``compute_density_for_timestep_
    sampling``: logit-normal(0, 1) or uniform), index ``int(u·N)`` of the scheduler's ``N`` training timesteps,
    and that timestep's σ (shifted by the model's ``shift`` unless the schedule shifts per resolution, FLUX's).
    The loss is not weighted by σ: the SD 3 script's default ``--precondition_outputs`` regresses ``x0`` instead,
    which is this loss weighted by σ²; the FLUX script and the SD 3 paper's rectified flow use this one.

    Args:
        scheduler_config: The model's ``FlowMatchEulerDiscreteScheduler`` config.
        sampling: ``"uniform"`` or ``"logit_normal"`` (``Family.timestep_sampling``).
    """

    SAMPLINGS = ("uniform", "logit_normal")

    def __init__(self, scheduler_config, *, sampling: str):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if sampling not in self.SAMPLINGS:
            raise ValueError(f"sampling must be one of {self.SAMPLINGS}, got {sampling!r}.")
        self.schedule = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)  # its training timesteps
        self.sampling = sampling

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.config.num_train_timesteps)

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """float32 ``[B]``: the noise level σ of each training timestep (one of ``schedule.timesteps``)."""
        grid = self.schedule.timesteps.to(timesteps.device)
        matches = timesteps.float()[:, None] == grid[None]
        if not bool(matches.any(1).all()):
            raise ValueError("Flow training timesteps must be ones of the scheduler's training timesteps.")
        return self.schedule.sigmas.to(timesteps.device)[matches.float().argmax(1)].float()

    def __call__(self, latents: torch.Tensor, generator: torch.Generator,
                 timesteps: Optional[torch.Tensor] = None) -> NoisedLatents:
        """Noise ``latents`` (the VAE's shifted and scaled latents): the noise first, then, unless given, one
        training timestep per row, both from ``generator`` (on the CPU)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        latents = latents.float()
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        if timesteps is None:
            u = compute_density_for_timestep_sampling("logit_normal" if self.sampling == "logit_normal" else "none",
                                                      len(latents), logit_mean=0.0, logit_std=1.0,
                                                      generator=generator)
            indices = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
            timesteps = self.schedule.timesteps[indices]
        timesteps = timesteps.to(latents.device, torch.float32)
        sigma = self.sigmas(timesteps).reshape(-1, *[1] * (latents.ndim - 1))
        noisy = (1 - sigma) * latents + sigma * noise
        return NoisedLatents(noisy, noise, timesteps, noise - latents)


def training_noise_of(components):
    """The forward process ``components``' denoiser trains with: ``TrainingNoise`` on a U-Net family's
    DDPM schedule, ``FlowTrainingNoise`` on a flow family's (``Family.timestep_sampling``)."""
    family = components.kind
    if family.flow:
        return FlowTrainingNoise(components.scheduler.config, sampling=family.timestep_sampling)
    return TrainingNoise(components.scheduler.config)


def sample_latents(components, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents drawn from the VAE posteriors ``moments`` (``[B, 2C, h, w]``: means, log-variances)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * components.vae.config.scaling_factor


@torch.no_grad()
def noise_prediction_error(components, conditions: torch.Tensor, moments: torch.Tensor, timesteps, *,
                           seed: int = 0, batch_size: int = 32) -> torch.Tensor:
    """float32 ``[len(timesteps)]``: the mean squared error of the U-Net's prediction for these images
    under ``conditions`` (``[N, L, D]``, or ``[L, D]`` for all) at each timestep, on draws fixed by
    ``seed``, so two conditions (or two U-Nets) are compared on the same noisy latents: what every
    objective here lowers."""
    training_noise = TrainingNoise(components.scheduler.config)
    conditions = conditions.expand(len(moments), -1, -1) if conditions.ndim == 2 else conditions
    errors = []
    for t in timesteps:
        total = 0.0
        for start in range(0, len(moments), batch_size):
            part = slice(start, start + batch_size)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
            latents = sample_latents(components, moments[part], generator)
            drawn = training_noise(latents, generator, torch.full((len(latents),), int(t)))
            predicted = components.unet(drawn.noisy.to(components.unet.dtype), drawn.timesteps,
                                        encoder_hidden_states=conditions[part].to(components.unet.dtype)).sample
            total += float(F.mse_loss(predicted.float(), drawn.target, reduction="sum"))
        errors.append(total / moments[:, : moments.shape[1] // 2].numel())
    return torch.tensor(errors)
