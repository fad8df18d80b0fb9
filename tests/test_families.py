"""Each model family equals its diffusers pipelines on tiny random components: one continuously batched
call of mixed strengths against the img2img pipeline run per strength, and text-to-image (Diff-Gen)."""
from __future__ import annotations

import os

import diffusers
import pytest
import torch

from onlinemix.generator.families import FAMILIES, family_of
from onlinemix.generator.sampler import Sampler
from onlinemix.generator.tiny import (tiny_components, tiny_flux_components, tiny_sd3_components,
                                      tiny_sdxl_components)

BUILDERS = {
    "sdxl": tiny_sdxl_components,
    "sd3": tiny_sd3_components,
    "sd3-without-t5": lambda seed: tiny_sd3_components(seed, t5=False),
    "flux-dev": tiny_flux_components,
    "flux-schnell": lambda seed: tiny_flux_components(seed, guidance_embeds=False),
}
PROMPTS = ["a photo of a bird on water", "a red bird", "a photo of a bird on grass", "a bird"]
SEEDS = [3, 5, 8, 13]
STRENGTHS = [0.5, 0.7, 0.9, 0.7]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def components(request):
    return BUILDERS[request.param](0)


def references(n=4, size=64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(11))


def pipeline(components, which: int):
    pipe = components.pipeline(getattr(diffusers, components.kind.pipelines[which]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_mixed_strengths_in_one_batch_equal_the_img2img_pipeline_per_strength(components):
    """25 steps, guidance 4: the strengths' first steps differ per family (SD 3 and FLUX run 18 steps at 0.7, the
    U-Nets 17), and FLUX-dev embeds the scale where the others guide classifier-free."""
    images = references()
    ours = Sampler(components, steps=25, guidance=4.0).translate(images, PROMPTS, STRENGTHS, SEEDS)
    pipe = pipeline(components, 1)
    for strength in sorted(set(STRENGTHS)):
        rows = [i for i, s in enumerate(STRENGTHS) if s == strength]
        expected = pipe(prompt=[PROMPTS[i] for i in rows], image=images[rows], strength=strength, height=64, width=64,
                        num_inference_steps=25, guidance_scale=4.0, output_type="pt",
                        generator=[torch.Generator().manual_seed(SEEDS[i]) for i in rows]).images
        torch.testing.assert_close(ours[rows], expected, rtol=0, atol=1e-4)


def test_generate_equals_the_text_to_image_pipeline(components):
    ours = Sampler(components, steps=8, guidance=3.0).generate(PROMPTS[:2], SEEDS[:2], height=64, width=64)
    expected = pipeline(components, 0)(prompt=PROMPTS[:2], height=64, width=64, num_inference_steps=8,
                                       guidance_scale=3.0, output_type="pt",
                                       generator=[torch.Generator().manual_seed(s) for s in SEEDS[:2]]).images
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_guidance_reaches_every_family_that_has_it(components):
    """A changed scale changes the image, except on FLUX.1-schnell, which has no guidance of any kind."""
    images = references(1)
    low, high = (Sampler(components, steps=4, guidance=g).translate(images, PROMPTS[:1], [0.9], SEEDS[:1])
                 for g in (1.0, 6.0))
    schnell = components.family == "flux" and not components.transformer.config.guidance_embeds
    assert torch.equal(low, high) == schnell


def test_flow_families_start_where_their_pipelines_do():
    """SD 3's and FLUX's pipelines skip int(steps - steps·s) steps, the U-Nets' steps - int(steps·s)."""
    flow, unet = FAMILIES["flux"], FAMILIES["sdxl"]
    assert [flow.first_step(25, s) for s in (0.5, 0.7, 0.9, 1.0)] == [12, 7, 2, 0]
    assert [unet.first_step(25, s) for s in (0.5, 0.7, 0.9, 1.0)] == [13, 8, 3, 0]


def test_an_unsupported_pipeline_is_refused_with_the_supported_list():
    assert family_of("StableDiffusionXLImg2ImgPipeline").name == "sdxl"
    with pytest.raises(ValueError, match=r"cannot drive a 'KandinskyPipeline'.*'FluxPipeline'"):
        family_of("KandinskyPipeline")


def test_what_only_stable_diffusion_offers_is_refused_with_a_sentence():
    sdxl = tiny_sdxl_components(0)
    with pytest.raises(ValueError, match="deep_cache needs a Stable Diffusion 1.x/2.x U-Net"):
        Sampler(sdxl, deep_cache=2)
    sampler = Sampler(sdxl, steps=4)
    with pytest.raises(ValueError, match="Weighted prompts .* the sdxl family takes plain strings"):
        sampler.embed([(("a bird", 1.0), ("red", 1.5))])
    with pytest.raises(ValueError, match="Conditioning tensors .* the sdxl family takes prompts"):
        sampler.generate(torch.zeros(1, 77, 64), [0], height=64, width=64)
    flux = Sampler(tiny_flux_components(0), steps=4)
    with pytest.raises(ValueError, match="multiples of 16 for this flux generator"):
        flux.generate(["a bird"], [0], height=72, width=72)
    assert tiny_components(0).kind.name == "sd"


def test_a_saved_generator_loads_as_its_family_with_the_same_images(components, tmp_path):
    from onlinemix.generator.components import load_components

    components.save(tmp_path)
    loaded = load_components(tmp_path)
    assert loaded.family == components.family
    assert type(loaded.scheduler) is type(components.scheduler)
    images = references(1)
    ours, theirs = (Sampler(c, steps=4).translate(images, PROMPTS[:1], [0.7], SEEDS[:1]) for c in (components, loaded))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_folders_of_other_pipelines_or_missing_parts_are_refused_before_loading(tmp_path):
    import json
    import shutil

    from onlinemix.generator.components import model_source

    tiny_sdxl_components(0).save(tmp_path / "sdxl")
    shutil.rmtree(tmp_path / "sdxl" / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"not a complete diffusers SDXL folder: .*'text_encoder_2'"):
        model_source(tmp_path / "sdxl")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match="cannot drive a 'KandinskyV22Pipeline'"):
        model_source(tmp_path / "other")


def test_prompt_encodings_equal_the_pipelines_encode_prompt(components):
    """The family's own (trainable) encoder gives the states and pooled vector its pipeline's ``encode_prompt`` does."""
    pipe = pipeline(components, 0)
    states, pooled = components.kind.encode_prompt(components, PROMPTS[0])
    if components.family == "flux":
        expected_states, expected_pooled, _ = pipe.encode_prompt(PROMPTS[0], None)
    elif components.family == "sd3":
        expected_states, _, expected_pooled, _ = pipe.encode_prompt(PROMPTS[0], None, None,
                                                                    do_classifier_free_guidance=False)
    else:
        expected_states, _, expected_pooled, _ = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=False)
    torch.testing.assert_close(states, expected_states[0], rtol=0, atol=0)
    torch.testing.assert_close(pooled, expected_pooled[0], rtol=0, atol=0)


def test_distill_and_invert_refuse_the_families_they_cannot_train_before_loading(tmp_path):
    """distill and invert train a Stable Diffusion U-Net's objective (``check_base_model(families=("sd",))``);
    finetune and train.py's generator take every family, but refuse the U-Net families' speed options on a flow
    model, all before loading anything."""
    import argparse

    from onlinemix.commands import check_base_model
    from onlinemix.generator.components import model_family, model_source
    from onlinemix.generator.worker import GeneratorSpec, check_family_options

    tiny_flux_components(0).save(tmp_path / "flux")
    assert model_source(tmp_path / "flux") == str(tmp_path / "flux")
    assert model_family(str(tmp_path / "flux")).name == "flux" and model_family("org/name") is None
    with pytest.raises(ValueError, match="is a FLUX.1 model; this command takes Stable Diffusion models only"):
        model_source(tmp_path / "flux", families=("sd",))
    args = argparse.Namespace(model=str(tmp_path / "flux"), out=str(tmp_path / "out"), local_files_only=True,
                              resolution=64)
    check_base_model(args, out="the personalised generator")
    with pytest.raises(ValueError, match="is a FLUX.1 model"):
        check_base_model(args, out="the store", families=("sd",))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="own flow-matching Euler scheduler; scheduler='lcm' is for the U-Net"):
        check_family_options(FAMILIES["flux"], GeneratorSpec(model="m", scheduler="lcm", accelerator="a.safetensors"))
    with pytest.raises(ValueError, match="DeepCache need a Stable Diffusion 1.x/2.x generator"):
        check_family_options(FAMILIES["sdxl"], GeneratorSpec(model="m", deep_cache=2))


@pytest.mark.parametrize("name", ["sd", *sorted(BUILDERS)])
def test_fused_qkv_projections_give_the_same_images_up_to_rounding(name):
    """``fuse_qkv``: each attention's query, key and value (and SD 3's and FLUX's text-stream ones) become one
    projection, on every family, and the translations stay what they were."""
    import dataclasses

    from onlinemix.generator.worker import GeneratorSpec, build_sampler

    make = tiny_components if name == "sd" else BUILDERS[name]
    spec = GeneratorSpec(model="m", steps=6, guidance=3.0)
    images = references(2)
    plain = build_sampler(make(0), spec).translate(images, PROMPTS[:2], [0.7, 0.9], SEEDS[:2])
    components = make(0)
    fused = build_sampler(components, dataclasses.replace(spec, fuse_qkv=True))
    assert any(hasattr(m, "to_qkv") for m in components.denoiser.modules()), "the projections are joined"
    torch.testing.assert_close(fused.translate(images, PROMPTS[:2], [0.7, 0.9], SEEDS[:2]), plain, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="keep fuse_lora=True and attention='sdpa'"):
        dataclasses.replace(spec, fuse_qkv=True, fuse_lora=False)


def test_a_hub_model_in_the_cache_tells_its_family_before_loading(tmp_path):
    """``model_family`` of a hub id reads the cached ``model_index.json`` (nothing is fetched); an id not in the
    cache gives None, to be read once a worker loads it."""
    import json
    import subprocess
    import sys

    snapshot = tmp_path / "models--org--flux" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (tmp_path / "models--org--flux" / "refs").mkdir()
    (tmp_path / "models--org--flux" / "refs" / "main").write_text("abc")
    code = ("from onlinemix.generator.components import model_family\n"
            "print(model_family('org/flux').name, model_family('org/elsewhere'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert done.stdout.split() == ["flux", "None"], done.stderr[-2000:]
