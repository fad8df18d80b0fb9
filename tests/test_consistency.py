"""The latent consistency distillation objective, pinned to diffusers' LCMScheduler and DDIMScheduler."""
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from onlinemix.consistency import (ConsistencyDistillation, boundary_scalings, consistency_function, pseudo_huber,
                                   solver_timesteps)
from onlinemix.generator.components import SD_SCHEDULER

SCHEDULE = {k: v for k, v in SD_SCHEDULER.items() if k not in ("algorithm_type", "solver_order")}
ALPHAS = DDIMScheduler(**SCHEDULE).alphas_cumprod


def latents(n=3, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_the_solver_grid_is_the_one_lcm_samples_from():
    lcm = LCMScheduler(**SCHEDULE)
    lcm.set_timesteps(50, original_inference_steps=50)
    assert torch.equal(solver_timesteps(1000, 50), lcm.timesteps.flip(0))
    with pytest.raises(ValueError, match="must divide the 1000"):
        solver_timesteps(1000, 30)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_the_consistency_function_is_what_lcm_denoises_with(steps):
    lcm = LCMScheduler(**SCHEDULE)
    lcm.set_timesteps(steps)
    sample, noise = latents(), latents(seed=1)
    for t in lcm.timesteps:
        expected = lcm.step(noise, t, sample, generator=torch.Generator().manual_seed(0)).denoised
        ours = consistency_function(noise, sample, t.repeat(len(sample)), ALPHAS)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]))
    assert c_skip.tolist() == [1.0, pytest.approx(0.0, abs=1e-7)] and c_out[0] == 0


class Recorder:
    """A noise prediction ``eps = scale · x + bias(text)`` that records how it was called."""

    def __init__(self, scale):
        self.scale, self.calls = scale, []

    def __call__(self, sample, timesteps, states):
        self.calls.append(dict(n=len(sample), timesteps=timesteps.clone(), grad=torch.is_grad_enabled()))
        return self.scale * sample + states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_the_teacher_step_is_a_guided_ddim_step_along_the_grid():
    ddim = DDIMScheduler(**{**SCHEDULE, "timestep_spacing": "trailing", "set_alpha_to_one": False,
                            "clip_sample": False})
    ddim.set_timesteps(50)
    teacher = Recorder(torch.tensor(0.3))
    loss = ConsistencyDistillation(Recorder(0.1), teacher, SCHEDULE, guidance=7.5)
    sample, text, empty = latents(2), torch.full((2, 77, 8), 0.5), torch.zeros(1, 77, 8)
    for t in (999, 499, 19):
        timesteps = torch.full((2,), t)
        guided = teacher(sample, timesteps, empty.expand(2, -1, -1)) + 7.5 * 0.5
        expected = ddim.step(guided, t, sample, eta=0.0).prev_sample
        stepped, previous = loss.teacher_step(sample, timesteps, text, empty)
        torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)
        assert previous.tolist() == [max(t - 20, 0)] * 2


def test_the_student_learns_only_from_its_prediction_at_the_start_never_from_the_target():
    student, teacher = Recorder(torch.tensor(0.1, requires_grad=True)), Recorder(torch.tensor(0.3))
    loss = ConsistencyDistillation(student, teacher, SCHEDULE, guidance=7.5, max_strength=0.5)
    value = loss(latents(4), torch.full((4, 77, 8), 0.5), torch.zeros(1, 77, 8),
                 generator=torch.Generator().manual_seed(0))
    value.backward()
    assert student.scale.grad is not None and torch.isfinite(value)
    assert [c["grad"] for c in student.calls] == [True, False], "the target is taken without gradient"
    assert [(c["n"], c["grad"]) for c in teacher.calls] == [(8, False)], "conditional and unconditional in one call"
    starts = student.calls[0]["timesteps"]
    assert all(t in solver_timesteps().tolist() and t <= 500 for t in starts.tolist()), "SDEdit's starts only"
    assert torch.equal(student.calls[1]["timesteps"], (starts - 20).clamp(min=0))


def point_mass_noise(x0):
    """The exact noise prediction of data that is the single point ``x0``: its x0 estimate is always ``x0``."""
    def predict(sample, timesteps, states):
        a = ALPHAS[timesteps].reshape(-1, 1, 1, 1)
        return (sample - a.sqrt() * x0) / (1 - a).sqrt()
    return predict


def test_at_the_first_grid_point_the_target_is_the_guided_teachers_denoised_sample():
    """Consistency along a trajectory holds for any constant predictor; the boundary anchors it. From the
    first grid point the target is the teacher's DDIM step to the end itself (c_skip = 1 at timestep 0), so
    there the loss pulls the student to the guided teacher's sample."""
    x0 = latents(1, seed=3)
    teacher, text, empty = point_mass_noise(x0), torch.zeros(16, 77, 8), torch.zeros(1, 77, 8)

    def score(student):
        loss = ConsistencyDistillation(student, teacher, SCHEDULE, guidance=1.0, max_strength=0.02)
        assert loss.starts.tolist() == [19]
        return loss(x0.expand(16, -1, -1, -1), text, empty, generator=torch.Generator().manual_seed(0)).item()

    assert score(teacher) < 0.1 * score(point_mass_noise(x0 + 1)), "the teacher's own end point scores lowest"
    by_hand = ConsistencyDistillation(teacher, teacher, SCHEDULE, guidance=1.0, max_strength=0.02)
    generator = torch.Generator().manual_seed(0)
    torch.randint(1, (16,), generator=generator)
    noise = torch.randn(16, *x0.shape[1:], generator=generator)
    a = ALPHAS[19]
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    timesteps = torch.full((16,), 19)
    end, _ = by_hand.teacher_step(noisy, timesteps, text, empty)
    expected = pseudo_huber(consistency_function(teacher(noisy, timesteps, text), noisy, timesteps, ALPHAS), end)
    assert score(teacher) == pytest.approx(expected.item(), rel=1e-5)


def test_pseudo_huber_and_bad_settings():
    assert pseudo_huber(torch.zeros(3), torch.zeros(3)) == 0
    assert pseudo_huber(torch.zeros(1), torch.full((1,), 3.0), c=0.001).item() == pytest.approx(3.0, abs=1e-3)
    with pytest.raises(ValueError, match="guidance must be >= 1"):
        ConsistencyDistillation(Recorder(0.1), Recorder(0.1), SCHEDULE, guidance=0.5)
    with pytest.raises(ValueError, match=r"max_strength must be in \(0, 1\]"):
        ConsistencyDistillation(Recorder(0.1), Recorder(0.1), SCHEDULE, max_strength=0.0)
    with pytest.raises(ValueError, match="No solver timestep lies below"):
        ConsistencyDistillation(Recorder(0.1), Recorder(0.1), SCHEDULE, max_strength=0.01)
