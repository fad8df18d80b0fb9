import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from onlinemix.generator.components import tiny_components
from onlinemix.generator.sampler import Sampler


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
        assert calls == [2, 1], "each prompt, and the empty one, is encoded once"
    finally:
        hook.remove()


def test_sampler_errors(components):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Sampler(components, steps=0)
    with pytest.raises(ValueError, match="guidance must be >= 1"):
        Sampler(components, guidance=0.5)
    sampler = Sampler(components, steps=2)
    with pytest.raises(ValueError, match="one prompt, strength and seed"):
        sampler.translate(references(2), PROMPTS[:1], [0.5, 0.5], SEEDS[:2])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sampler.translate(references(1), PROMPTS[:1], [0.0], SEEDS[:1])
    with pytest.raises(ValueError, match="multiples of 8"):
        sampler.generate(PROMPTS[:1], SEEDS[:1], height=60, width=64)
