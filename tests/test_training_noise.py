"""``TrainingNoise``: the noise level of every training timestep is diffusers' DDPM schedule, the target
is epsilon or the velocity, and personalisation, inversion and the demo pretraining all noise through it."""
import numpy as np
import pytest
import torch

from onlinemix.training_noise import TrainingNoise

# Stable Diffusion 1.5's scheduler config (its scheduler/scheduler_config.json).
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False)
TIMESTEPS = torch.tensor([0, 10, 50, 500, 999])


def sd15_alpha_bar() -> np.ndarray:
    """ᾱ_t of SD 1.5 from its definition: betas linear in sqrt between beta_start and beta_end."""
    betas = np.linspace(SD15["beta_start"] ** 0.5, SD15["beta_end"] ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def signal_and_noise(training_noise, timesteps):
    """The coefficients of latents and noise in ``noisy`` at ``timesteps``, read off two draws."""
    ones = torch.ones(len(timesteps), 1, 1, 1)
    drawn = training_noise(ones, torch.Generator().manual_seed(0), timesteps)
    zero = training_noise(torch.zeros_like(ones), torch.Generator().manual_seed(0), timesteps)
    noise_coefficient = zero.noisy.flatten() / drawn.noise.flatten()
    return (drawn.noisy - zero.noisy).flatten(), noise_coefficient


@pytest.mark.parametrize("built_from", ["DDPMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"])
def test_the_noise_level_of_every_timestep_is_ddpm_on_the_sd15_schedule(built_from):
    """Whatever scheduler the model samples with, training timestep t gets DDPM's sqrt(ᾱ_t)."""
    import diffusers

    config = getattr(diffusers, built_from).from_config(SD15).config
    signal, noise = signal_and_noise(TrainingNoise(config), TIMESTEPS)
    alpha_bar = torch.from_numpy(sd15_alpha_bar()[TIMESTEPS.numpy()]).float()
    torch.testing.assert_close(signal, alpha_bar.sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(noise, (1 - alpha_bar).sqrt(), rtol=1e-4, atol=1e-5)
    reference = diffusers.DDPMScheduler.from_config(SD15).alphas_cumprod[TIMESTEPS]
    torch.testing.assert_close(signal, reference.sqrt())
    assert signal.tolist() == pytest.approx([0.99957, 0.99520, 0.97549, 0.52567, 0.06826], abs=1e-4)


def test_a_sampling_schedulers_own_add_noise_is_not_the_training_noise():
    """The defect this helper exists for: DPM-Solver++'s add_noise before set_timesteps pairs t with 999 - t."""
    from diffusers import DPMSolverMultistepScheduler

    sampling = DPMSolverMultistepScheduler.from_config(SD15)
    ones = torch.ones(len(TIMESTEPS), 1)
    wrong = sampling.add_noise(ones, torch.zeros_like(ones), TIMESTEPS).flatten()
    mirrored, _ = signal_and_noise(TrainingNoise(sampling.config), 999 - TIMESTEPS)
    torch.testing.assert_close(wrong, mirrored, rtol=2e-3, atol=2e-3)
    assert float(wrong[0]) == pytest.approx(0.0683, abs=1e-3)


def test_the_target_is_the_noise_or_the_velocity():
    latents = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    epsilon = TrainingNoise(SD15)(latents, torch.Generator().manual_seed(2), TIMESTEPS)
    torch.testing.assert_close(epsilon.target, epsilon.noise)
    drawn = TrainingNoise({**SD15, "prediction_type": "v_prediction"})(latents, torch.Generator().manual_seed(2),
                                                                       TIMESTEPS)
    alpha_bar = torch.from_numpy(sd15_alpha_bar()[TIMESTEPS.numpy()]).float().view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * drawn.noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(drawn.target, velocity, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(drawn.noisy, epsilon.noisy), "the same draws: only the target differs"


def test_timesteps_are_drawn_after_the_noise_over_the_whole_training_range():
    training_noise = TrainingNoise(SD15)
    drawn = training_noise(torch.zeros(4000, 1), torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(4000, 1, generator=generator)
    torch.testing.assert_close(drawn.noise, noise)
    assert torch.equal(drawn.timesteps, torch.randint(0, 1000, (4000,), generator=generator))
    assert int(drawn.timesteps.min()) < 5 and int(drawn.timesteps.max()) > 994 and drawn.timesteps.dtype == torch.int64


def test_an_unsupported_prediction_type_is_refused():
    with pytest.raises(ValueError, match="predicts 'sample'"):
        TrainingNoise({**SD15, "prediction_type": "sample"})


def test_personalisation_inversion_and_pretraining_all_noise_through_it(monkeypatch):
    """The three objectives cannot diverge: each calls ``TrainingNoise`` for its noised latents."""
    from onlinemix import demo_model, training_noise
    from onlinemix.generator.tiny import tiny_components
    from onlinemix.invert import inversion_loss
    from onlinemix.personalise import Personaliser

    calls = []
    original = training_noise.TrainingNoise.__call__

    def counted(self, latents, generator, timesteps=None):
        calls.append(len(latents))
        return original(self, latents, generator, timesteps)

    monkeypatch.setattr(training_noise.TrainingNoise, "__call__", counted)
    components = tiny_components()
    personaliser = Personaliser(components, ["a", "b"], "shape", method="ti")
    personaliser.loss(torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    width = components.unet.config.cross_attention_dim
    inversion_loss(components, TrainingNoise(components.scheduler.config), torch.zeros(3, 2, width),
                   torch.zeros(3, 8, 4, 4), torch.Generator().manual_seed(0))
    tiny = tiny_components()
    demo_model.train_denoiser(tiny, torch.zeros(6, 4, 4, 4), torch.ones(6, 4, 4, 4), ["x"] * 6, steps=1,
                              batch_size=5, lr=1e-3, seed=0, progress=False)
    assert calls == [2, 3, 5]
