import dataclasses
from collections import Counter

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from onlinemix.generator.tiny import tiny_components
from onlinemix.generator.sampler import Sampler, check_steps


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=0)


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def references(n=3, size=64):
    g = torch.Generator().manual_seed(11)
    return torch.rand(n, 3, size, size, generator=g)


PROMPTS = ["a photo of a bird on water", "a red bird", "a photo of a bird on grass"]
SEEDS = [3, 5, 8]


@pytest.mark.parametrize("strength", [0.5, 0.7, 0.9, 1.0])
def test_translate_equals_diffusers_img2img(components, strength):
    pipe = components.pipeline(StableDiffusionImg2ImgPipeline)
    pipe.set_progress_bar_config(disable=True)
    images = references()
    expected = pipe(prompt=PROMPTS, image=images, strength=strength, num_inference_steps=25, guidance_scale=7.5,
                    generator=generators(SEEDS), output_type="pt").images
    ours = Sampler(components, steps=25, guidance=7.5).translate(images, PROMPTS, [strength] * 3, SEEDS)
    assert ours.shape == expected.shape == (3, 3, 64, 64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_generate_equals_diffusers_txt2img(components):
    pipe = components.pipeline(StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt=PROMPTS, height=64, width=64, num_inference_steps=25, guidance_scale=7.5,
                    generator=generators(SEEDS), output_type="pt").images
    ours = Sampler(components).generate(PROMPTS, SEEDS, height=64, width=64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_mixed_strengths_equal_each_sample_run_alone(components):
    sampler = Sampler(components, steps=10, guidance=3.0)
    images = references()
    strengths = [0.9, 0.5, 0.7]
    mixed = sampler.translate(images, PROMPTS, strengths, SEEDS)
    for i in range(3):
        alone = sampler.translate(images[i:i + 1], PROMPTS[i:i + 1], strengths[i:i + 1], SEEDS[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-4)
    assert not torch.allclose(mixed[0], sampler.translate(images[:1], PROMPTS[:1], [0.5], SEEDS[:1])[0], atol=1e-3)


def test_guidance_one_disables_cfg_and_matches_diffusers(components):
    pipe = components.pipeline(StableDiffusionImg2ImgPipeline)
    pipe.set_progress_bar_config(disable=True)
    images = references(2)
    expected = pipe(prompt=PROMPTS[:2], image=images, strength=0.7, num_inference_steps=8, guidance_scale=1.0,
                    generator=generators(SEEDS[:2]), output_type="pt").images
    ours = Sampler(components, steps=8, guidance=1.0).translate(images, PROMPTS[:2], [0.7, 0.7], SEEDS[:2])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_prompt_embeddings_are_cached(components):
    calls = []
    hook = components.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        sampler = Sampler(components, steps=3)
        first = sampler.embed(["a bird", "a cat", "a bird"])
        torch.testing.assert_close(first[0], first[2])
        sampler.embed(["a cat", "a bird"])
        sampler.translate(references(2), ["a cat", "a bird"], [0.5, 0.7], SEEDS[:2])
        assert calls == [1, 1, 1], "each prompt, and the empty one, is encoded once, alone"
    finally:
        hook.remove()


def test_sampler_errors(components):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Sampler(components, steps=0)
    with pytest.raises(ValueError, match="guidance must be >= 1"):
        Sampler(components, guidance=0.5)
    sampler = Sampler(components, steps=2)
    with pytest.raises(ValueError, match=r"one condition \(prompt or tensor\), strength, seed, tag"):
        sampler.translate(references(2), PROMPTS[:1], [0.5, 0.5], SEEDS[:2])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sampler.translate(references(1), PROMPTS[:1], [0.0], SEEDS[:1])
    with pytest.raises(ValueError, match="multiples of 8"):
        sampler.generate(PROMPTS[:1], SEEDS[:1], height=60, width=64)


GRID_STRENGTHS = [round(0.01 * i, 2) for i in range(1, 101)]


def diffusers_img2img_start(pipe, steps, strength):
    """Where diffusers' img2img starts: (first timestep, denoising steps run)."""
    pipe.scheduler.set_timesteps(steps)
    timesteps, run = pipe.get_timesteps(steps, strength, "cpu")
    return (float(timesteps[0]) if len(timesteps) else None), run


@pytest.mark.slow
def test_sdedit_schedule_equals_diffusers_over_the_grid(components):
    """Every (steps 1-50, strength 0.01-1.00) starts where StableDiffusionImg2ImgPipeline starts; check_steps
    refuses exactly the pairs that would run no step. Translating all strengths of one step count in one
    mixed batch, each sample meets in the U-Net exactly the timesteps diffusers' img2img runs it through, and the
    batch takes as many U-Net calls as its longest sample."""
    pipe = components.pipeline(StableDiffusionImg2ImgPipeline)
    calls = []
    hook = components.unet.register_forward_hook(
        lambda module, args, out: calls.append([float(t) for t in args[1]]))
    try:
        for steps in range(1, 51):
            expected = {s: diffusers_img2img_start(pipe, steps, s) for s in GRID_STRENGTHS}
            runnable = [s for s in GRID_STRENGTHS if expected[s][1] >= 1]
            for s in GRID_STRENGTHS:
                if expected[s][1] < 1:
                    with pytest.raises(ValueError, match="no denoising step"):
                        check_steps(steps, [s])
                else:
                    check_steps(steps, [s])
            pipe.scheduler.set_timesteps(steps)
            schedule = [float(t) for t in pipe.scheduler.timesteps]
            calls.clear()
            sampler = Sampler(components, steps=steps, guidance=2.0)
            n = len(runnable)
            sampler.translate(torch.rand(n, 3, 16, 16), ["a bird"] * n, runnable, list(range(n)))
            want = Counter(t for s in runnable for t in 2 * schedule[schedule.index(expected[s][0]):])
            seen = Counter(t for call in calls for t in call)
            assert seen == want, f"{steps} steps: the samples' timesteps differ from diffusers' img2img"
            assert len(calls) == max(expected[s][1] for s in runnable)
    finally:
        hook.remove()


@pytest.mark.parametrize("steps, strength", [(10, 0.7), (25, 0.52), (50, 0.9), (25, 0.04)])
def test_translate_equals_diffusers_where_float32_rounding_used_to_start_late(components, steps, strength):
    pipe = components.pipeline(StableDiffusionImg2ImgPipeline)
    pipe.set_progress_bar_config(disable=True)
    images = references(2)
    expected = pipe(prompt=PROMPTS[:2], image=images, strength=strength, num_inference_steps=steps,
                    guidance_scale=7.5, generator=generators(SEEDS[:2]), output_type="pt").images
    ours = Sampler(components, steps=steps, guidance=7.5).translate(images, PROMPTS[:2], [strength] * 2, SEEDS[:2])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def unet_inputs(components, n=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, size, size, generator=g)
    states = Sampler(components).embed(PROMPTS[:n])
    return latents, torch.tensor([901, 501, 41][:n]), states


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_deep_cache_shallow_call_equals_the_full_call_on_the_same_inputs(components, model):
    from onlinemix.generator.components import load_components
    from onlinemix.generator.deep_cache import DeepCacheUNet

    components = components if model == "tiny" else load_components("demo")  # cross-attention / plain last block
    latents, timesteps, states = unet_inputs(components, size=components.unet.config.sample_size)
    unet = DeepCacheUNet(components.unet)
    with torch.no_grad():
        expected = components.unet(latents, timesteps, encoder_hidden_states=states, return_dict=False)[0]
        full, deep = unet.full(latents, timesteps, states)
        shallow = unet.shallow(latents, timesteps, states, deep)
        stale = unet.shallow(latents, timesteps.flip(0), states, deep)
    torch.testing.assert_close(full, expected, rtol=0, atol=0)
    torch.testing.assert_close(shallow, expected, rtol=0, atol=1e-5)
    assert not torch.equal(stale, shallow), "the shallow call uses its own timesteps"


def test_deep_cache_refreshes_each_trajectory_on_its_own_phase(components, monkeypatch):
    from onlinemix.generator.deep_cache import DeepCacheUNet

    calls = {"full": 0, "shallow": 0}
    for name in calls:
        def counted(self, *args, _name=name, _method=getattr(DeepCacheUNet, name)):
            calls[_name] += 1
            return _method(self, *args)

        monkeypatch.setattr(DeepCacheUNet, name, counted)
    images, strengths = references(), [0.9, 0.5, 0.7]
    sampler = Sampler(components, steps=10, deep_cache=3)
    moments = sampler.encode(images)
    trajectories = sampler.start_translations(moments[:1], PROMPTS[:1], strengths[:1], SEEDS[:1], [0])
    sampler.step(trajectories)  # the others join one step later, out of phase
    trajectories += sampler.start_translations(moments[1:], PROMPTS[1:], strengths[1:], SEEDS[1:], [1, 2])
    while not all(t.done for t in trajectories):
        sampler.step(trajectories)
    tags, mixed = sampler.decode(trajectories)
    assert tags == [0, 2, 1], "by admission, then by first step"
    mixed = mixed[[0, 2, 1]]
    # 9, 5 and 7 steps, the first from step 0, the others from step 1; refreshes at each one's steps 0, 3, 6:
    # full calls at steps {0, 3, 6} | {1, 4} | {1, 4, 7}, shallow ones at every other step someone is in.
    assert calls == {"full": 6, "shallow": 8}
    for i in range(3):  # each trajectory kept its own phase: equal to the sample alone
        alone = sampler.translate(images[i:i + 1], PROMPTS[i:i + 1], strengths[i:i + 1], SEEDS[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-4)
    exact = Sampler(components, steps=10).translate(images, PROMPTS, strengths, SEEDS)
    assert not torch.allclose(mixed, exact, atol=1e-4), "reuse approximates"


def test_deep_cache_of_one_is_exact_and_bad_values_are_refused(components):
    images = references()
    exact = Sampler(components, steps=6).translate(images, PROMPTS, [0.5, 0.7, 1.0], SEEDS)
    torch.testing.assert_close(Sampler(components, steps=6, deep_cache=1).translate(
        images, PROMPTS, [0.5, 0.7, 1.0], SEEDS), exact, rtol=0, atol=0)
    with pytest.raises(ValueError, match="deep_cache must be >= 1"):
        Sampler(components, deep_cache=0)
    with pytest.raises(ValueError, match="posterior_cache must be >= 0"):
        Sampler(components, posterior_cache=-1)


def test_posteriors_are_encoded_once_and_evicted_least_recently_used(components):
    images = references(4)
    sampler = Sampler(components, posterior_cache=2)
    loads = []

    def load(keys):
        loads.append(list(keys))
        return images[keys]

    expected = sampler.encode(images)
    torch.testing.assert_close(sampler.posteriors([0, 1, 0], load), expected[[0, 1, 0]], rtol=0, atol=1e-5)
    torch.testing.assert_close(sampler.posteriors([1, 2], load), expected[[1, 2]], rtol=0, atol=1e-5)
    sampler.posteriors([0, 1], load)  # 0 was evicted (least recently used), 1 was kept
    assert loads == [[0, 1], [2], [0]]
    assert (sampler.posterior_hits, sampler.posterior_misses) == (3, 4)


def test_translation_from_cached_posteriors_equals_translate(components):
    images = references()
    sampler = Sampler(components, steps=8, posterior_cache=4)
    moments = sampler.posteriors([0, 1, 2], lambda keys: images[keys])
    trajectories = sampler.start_translations(moments, PROMPTS, [0.5, 0.9, 0.5], SEEDS, ["a", "b", "c"])
    assert [t.tags for t in trajectories] == [["b"], ["a", "c"]], "grouped by first step, the strongest first"
    while not all(t.done for t in trajectories):
        sampler.step(trajectories)
    tags, out = sampler.decode(trajectories)
    expected = sampler.translate(images, PROMPTS, [0.5, 0.9, 0.5], SEEDS)
    torch.testing.assert_close(out, expected[[1, 0, 2]], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="finished trajectories"):
        sampler.decode(sampler.start_translations(moments[:1], PROMPTS[:1], [0.5], SEEDS[:1], ["a"]))


def test_tensor_conditions_and_a_custom_unconditional_input_equal_diffusers(components):
    """Conditioning given as tensors (here 4 vectors, as an inverted condition) with the unconditional input
    their mean: equal to diffusers' pipelines given prompt_embeds / negative_prompt_embeds."""
    g = torch.Generator().manual_seed(2)
    width = components.unet.config.cross_attention_dim
    conditions = torch.randn(3, 4, width, generator=g)
    mean = conditions.mean(0)
    sampler = Sampler(components, steps=10, guidance=3.0)
    txt2img = components.pipeline(StableDiffusionPipeline)
    txt2img.set_progress_bar_config(disable=True)
    expected = txt2img(prompt_embeds=conditions, negative_prompt_embeds=mean.expand(3, -1, -1), height=32, width=32,
                       num_inference_steps=10, guidance_scale=3.0, generator=generators(SEEDS), output_type="pt").images
    ours = sampler.generate(conditions, SEEDS, height=32, width=32, unconditional=mean)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    img2img = components.pipeline(StableDiffusionImg2ImgPipeline)
    img2img.set_progress_bar_config(disable=True)
    images = references()
    expected = img2img(prompt_embeds=conditions, negative_prompt_embeds=mean.expand(3, -1, -1), image=images,
                       strength=0.7, num_inference_steps=10, guidance_scale=3.0, generator=generators(SEEDS),
                       output_type="pt").images
    ours = sampler.translate(images, conditions, [0.7] * 3, SEEDS, unconditional=mean)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    zeros = sampler.translate(images, conditions, [0.7] * 3, SEEDS, unconditional=torch.zeros(4, width))
    assert not torch.allclose(ours, zeros, atol=1e-3), "the unconditional input steers the guidance"


def test_per_sample_guidance_equals_each_sample_at_its_scale(components):
    pipe = components.pipeline(StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    scales = [1.0, 2.5, 7.5]
    batch = Sampler(components, steps=8).generate(PROMPTS, SEEDS, height=32, width=32, guidance=scales)
    for i, scale in enumerate(scales):
        alone = pipe(prompt=PROMPTS[i], height=32, width=32, num_inference_steps=8, guidance_scale=scale,
                     generator=generators(SEEDS[i:i + 1]), output_type="pt").images
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-4)


def test_conditioning_errors(components):
    sampler = Sampler(components, steps=4)
    width = components.unet.config.cross_attention_dim
    with pytest.raises(ValueError, match=r"must be \[B, L, 32\]"):
        sampler.generate(torch.zeros(2, 4, width + 1), [0, 1], height=32, width=32)
    with pytest.raises(ValueError, match="unconditional input must be"):
        sampler.generate(torch.zeros(2, 4, width), [0, 1], height=32, width=32)  # the empty prompt has 77 vectors
    with pytest.raises(ValueError, match="guidance scales must be >= 1"):
        sampler.generate(PROMPTS[:2], [0, 1], height=32, width=32, guidance=[2.0, 0.5])
    with pytest.raises(ValueError, match="guidance scale per sample"):
        sampler.generate(PROMPTS[:2], [0, 1], height=32, width=32, guidance=[2.0])
    short = sampler.start_generations(torch.zeros(1, 4, width), [0], [0], height=32, width=32,
                                      unconditional=torch.zeros(4, width))
    prompted = sampler.start_generations(PROMPTS[:1], [1], [1], height=32, width=32)
    with pytest.raises(ValueError, match="conditioning of one length"):
        sampler.step(short + prompted)


def test_deep_cache_with_guided_and_unguided_samples_equals_each_alone(components):
    """A guided sample (0.5) finishes first; the unguided one (0.9) then reuses the conditional copy of deep
    features captured in calls that also ran unconditional rows, and a newly admitted guided one forces a refresh."""
    sampler = Sampler(components, steps=10, deep_cache=2)
    images = references(3)
    moments = sampler.encode(images)
    trajectories = sampler.start_translations(moments[:2], PROMPTS[:2], [0.5, 0.9], SEEDS[:2], [0, 1],
                                              guidance=[4.0, 1.0])
    for _ in range(6):  # the guided sample's 5 steps, and one more
        sampler.step(trajectories)
    trajectories += sampler.start_translations(moments[2:], PROMPTS[2:], [0.5], SEEDS[2:], [2], guidance=[3.0])
    while not all(t.done for t in trajectories):
        sampler.step(trajectories)
    tags, mixed = sampler.decode(trajectories)
    for row, tag in enumerate(tags):
        alone = sampler.translate(images[tag:tag + 1], PROMPTS[tag:tag + 1], [[0.5, 0.9, 0.5][tag]], SEEDS[tag:tag + 1],
                                  guidance=[[4.0, 1.0, 3.0][tag]])
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=0, atol=1e-4)


class NoEmbedding:
    def to(self, **kwargs):
        return None


def test_a_schedule_fitted_inside_each_strength_equals_diffusers_lcm_img2img(components):
    """``schedule_in_strength``: every strength runs all its steps from s·T, as diffusers' LCM img2img pipeline
    places them; mixed strengths in one batch equal the pipeline run at each."""
    from diffusers import LatentConsistencyModelImg2ImgPipeline, LCMScheduler

    lcm = dataclasses.replace(components, scheduler=LCMScheduler.from_config(components.scheduler.config))
    pipe = lcm.pipeline(LatentConsistencyModelImg2ImgPipeline)
    pipe.set_progress_bar_config(disable=True)
    # The pipeline embeds the guidance scale for a full LCM's U-Net; an LCM-LoRA's U-Net takes none.
    pipe.get_guidance_scale_embedding = lambda w, embedding_dim: NoEmbedding()
    images, strengths = references(), [0.5, 0.7, 0.9]
    sampler = Sampler(lcm, steps=4, guidance=1.0, schedule_in_strength=True)
    ours = sampler.translate(images, PROMPTS, strengths, SEEDS)
    for i, strength in enumerate(strengths):
        expected = pipe(prompt=PROMPTS[i:i + 1], image=images[i:i + 1], strength=strength, num_inference_steps=4,
                        guidance_scale=1.0, generator=generators(SEEDS[i:i + 1]), output_type="pt").images
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=0, atol=1e-4)
    first = sampler._scheduler_at(0.7)[0].timesteps
    assert len(first) == 4 and int(first[0]) == 699, "4 steps from the grid point at 0.7 T"
    with pytest.raises(ValueError, match="schedule_in_strength needs a scheduler"):
        Sampler(components, schedule_in_strength=True)
