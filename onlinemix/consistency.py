"""Latent consistency distillation for SDEdit translation: the objective of ``onlinemix distill``.

The student is the personalised U-Net with an extra LoRA (the acceleration adapter); the
teacher is the same U-Net without it, guided (classifier-free, at the generator's scale).
Following latent consistency distillation (Luo et al., "Latent Consistency Models",
arXiv:2310.04378, and the LoRA form of "LCM-LoRA", arXiv:2311.05556), one training step

1. noises the latents of a training image to a timestep ``t`` of the solver grid (the
   timesteps ``LCMScheduler`` samples from: 50 evenly spaced, ending at 999) — only those an
   SDEdit translation starts at or passes through, ``t <= max_strength * T``;
2. moves ``x_t`` one grid step to ``t - k`` with the guided teacher and a DDIM step (the
   probability-flow ODE of the guided model, so guidance is baked into the student);
3. asks the student's consistency function at ``(x_t, t)`` to equal its own, without
   gradient, at ``(x_{t-k}, t - k)``, under a pseudo-Huber loss.

The consistency function is exactly what ``LCMScheduler.step`` denoises with
(``c_skip · x + c_out · x0``, the boundary scalings of a scaled timestep), so a student
trained here samples with ``--gen-scheduler lcm`` and guidance 1 (one U-Net call per step).
Why consistency distillation: it trains from any point of the trajectory to its end in one
LoRA, it needs only the teacher (no data beyond the training images, no discriminator), and
its sampler starts at any timestep, which is what SDEdit needs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# A U-Net's noise prediction: eps(latents, timesteps [B], text states [B, 77, D]).
NoisePrediction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def solver_timesteps(train_timesteps: int = 1000, solver_steps: int = 50) -> torch.Tensor:
    """The grid the student is trained on and ``LCMScheduler`` samples from, ascending:
    ``k - 1, 2k - 1, ..., train_timesteps - 1`` with ``k = train_timesteps // solver_steps``."""
    if solver_steps < 1 or train_timesteps % solver_steps:
        raise ValueError(f"solver_steps must divide the {train_timesteps} training timesteps, got {solver_steps}.")
    k = train_timesteps // solver_steps
    return torch.arange(1, solver_steps + 1) * k - 1


def boundary_scalings(timesteps: torch.Tensor, *, timestep_scaling: float = 10.0,
                      sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of the consistency function at ``timesteps`` (``LCMScheduler``'s discrete
    boundary condition: ``c_skip`` is 1 and ``c_out`` 0 at timestep 0)."""
    scaled = timesteps.double() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.float(), c_out.float()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def predicted_original(noise: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``x0`` from an epsilon prediction at cumulative alphas ``alpha_bar`` (one per sample)."""
    a = _per_sample(alpha_bar, sample)
    return (sample - (1 - a).sqrt() * noise) / a.sqrt()


def consistency_function(noise: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                         alphas_cumprod: torch.Tensor, *, timestep_scaling: float = 10.0) -> torch.Tensor:
    """The student's estimate of the trajectory's end: ``c_skip · x_t + c_out · x0(eps)``, as
    ``LCMScheduler.step`` computes its ``denoised``."""
    c_skip, c_out = boundary_scalings(timesteps, timestep_scaling=timestep_scaling)
    x0 = predicted_original(noise, sample, alphas_cumprod[timesteps.cpu()])
    return _per_sample(c_skip, sample) * sample + _per_sample(c_out, sample) * x0


def ddim_step(noise: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor,
              alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta 0) from cumulative alpha ``alpha_bar`` to ``alpha_bar_prev``."""
    x0 = predicted_original(noise, sample, alpha_bar)
    prev = _per_sample(alpha_bar_prev, sample)
    return prev.sqrt() * x0 + (1 - prev).sqrt() * noise


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """``mean(sqrt((prediction - target)^2 + c^2) - c)``: L2-like for large errors' gradients, robust near 0."""
    return (((prediction.float() - target.float()) ** 2 + c ** 2).sqrt() - c).mean()


class ConsistencyDistillation:
    """The loss of one batch of latent consistency distillation toward SDEdit translation.

    Args:
        student: The student's noise prediction (the U-Net with the acceleration adapter on).
        teacher: The teacher's (the same U-Net with it off).
        scheduler_config: The base model's scheduler config: its schedule noises the latents
            (``TrainingNoise``, the project's one forward process).
        guidance: The teacher's classifier-free guidance scale, baked into the student.
        solver_steps: Points of the solver grid (``solver_timesteps``); 50 as ``LCMScheduler``'s default
            ``original_inference_steps``.
        max_strength: The largest SDEdit strength the student will serve; it trains on grid timesteps up
            to ``max_strength · T``.
        huber_c: The pseudo-Huber constant.
        timestep_scaling: The boundary condition's timestep scaling (``LCMScheduler``'s).
    """

    def __init__(self, student: NoisePrediction, teacher: NoisePrediction, scheduler_config, *,
                 guidance: float = 7.5, solver_steps: int = 50, max_strength: float = 0.9, huber_c: float = 0.001,
                 timestep_scaling: float = 10.0):
        if guidance < 1:
            raise ValueError(f"guidance must be >= 1 (1: no classifier-free guidance), got {guidance}.")
        if not 0 < max_strength <= 1:
            raise ValueError(f"max_strength must be in (0, 1], got {max_strength}.")
        from .training_noise import TrainingNoise

        self.noising = TrainingNoise(scheduler_config)
        if self.noising.prediction_type != "epsilon":
            raise ValueError(f"Distillation supports epsilon-predicting models; this one predicts "
                             f"{self.noising.prediction_type!r}.")
        self.student, self.teacher = student, teacher
        alphas_cumprod = self.alphas_cumprod = self.noising.schedule.alphas_cumprod.float().cpu()
        self.guidance, self.huber_c, self.timestep_scaling = guidance, huber_c, timestep_scaling
        grid = solver_timesteps(len(alphas_cumprod), solver_steps)
        self.step = int(grid[0]) + 1
        self.starts = grid[grid <= max_strength * len(alphas_cumprod)]
        if len(self.starts) == 0:
            raise ValueError(f"No solver timestep lies below max_strength {max_strength} x {len(alphas_cumprod)}; "
                             "raise max_strength or solver_steps.")

    def guided_noise(self, sample: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor,
                     unconditional: torch.Tensor) -> torch.Tensor:
        """The teacher's guided prediction ``eps_u + w (eps_c - eps_u)``, conditional and unconditional rows in
        one call."""
        if self.guidance == 1:
            return self.teacher(sample, timesteps, conditions)
        both = self.teacher(torch.cat([sample, sample]), torch.cat([timesteps, timesteps]),
                            torch.cat([conditions, unconditional.expand_as(conditions)]))
        noise_text, noise_uncond = both.chunk(2)
        return noise_uncond + self.guidance * (noise_text - noise_uncond)

    def teacher_step(self, sample: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor,
                     unconditional: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_{t-k}, t - k)``: one DDIM step of the guided teacher along the grid (to timestep 0's alpha from
        the first grid point, as ``DDIMScheduler`` without ``set_alpha_to_one``)."""
        previous = (timesteps - self.step).clamp(min=0)
        noise = self.guided_noise(sample, timesteps, conditions, unconditional)
        return ddim_step(noise, sample, self.alphas_cumprod[timesteps.cpu()],
                         self.alphas_cumprod[previous.cpu()]), previous

    def __call__(self, latents: torch.Tensor, conditions: torch.Tensor, unconditional: torch.Tensor, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The loss of clean latents ``[B, C, h, w]`` under text states ``conditions`` ``[B, 77, D]`` (a
        target class's prompt each: the image may be of another class, as in a translation) and the empty
        prompt's ``unconditional`` ``[1, 77, D]``."""
        pick = torch.randint(len(self.starts), (len(latents),), generator=generator)
        timesteps = self.starts[pick].to(latents.device)
        noisy = self.noising(latents, generator, timesteps).noisy
        prediction = self.consistency(self.student(noisy, timesteps, conditions), noisy, timesteps)
        with torch.no_grad():
            previous, earlier = self.teacher_step(noisy, timesteps, conditions, unconditional)
            target = self.consistency(self.student(previous, earlier, conditions), previous, earlier)
        return pseudo_huber(prediction, target, self.huber_c)

    def consistency(self, noise: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return consistency_function(noise, sample, timesteps, self.alphas_cumprod,
                                    timestep_scaling=self.timestep_scaling)
