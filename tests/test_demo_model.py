"""The shipped demo generator and the script that pretrains it."""
import json
import os

import pytest
import torch

from onlinemix.data.demo_world import SPECIES, caption
from onlinemix import demo_model
from onlinemix.generator import components
from onlinemix.generator.components import load_components
from onlinemix.generator.sampler import Sampler


@pytest.fixture(scope="module")
def shipped():
    return load_components("demo")


def test_shipped_model_loads_through_the_normal_loader(shipped):
    folder = components.demo_model_path()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert size <= 25 * 2**20, f"the shipped generator must stay within 25 MB, it is {size / 2**20:.1f} MB"
    assert shipped.vae_scale_factor == 4 and shipped.unet.config.sample_size == 16
    assert shipped.dtype == torch.float32, "stored in float16, loaded as asked"
    # Every word of the corpus captions is one token, so prompts are short and words are units.
    words = caption(SPECIES[1], "water").replace(",", " ,").split()
    assert shipped.tokenizer.tokenize(" ".join(words)) == [w + "</w>" for w in words]
    with open(os.path.join(folder, "pretraining.json")) as f:
        info = json.load(f)
    assert info["unet_loss_last_100"] < info["unet_loss_first_100"]


def test_shipped_model_translates_and_generates(shipped):
    sampler = Sampler(shipped, steps=4, guidance=7.5)
    images = torch.rand(2, 3, 64, 64)
    out = sampler.translate(images, [caption(SPECIES[0], "land"), "a photo of a bird"], [0.5, 0.9], [0, 1])
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    again = sampler.translate(images, [caption(SPECIES[0], "land"), "a photo of a bird"], [0.5, 0.9], [0, 1])
    assert torch.equal(out, again)
    generated = sampler.generate(["a round crimson bird, on water"], [3], height=64, width=64)
    assert generated.shape == (1, 3, 64, 64) and generated.std() > 0.02


def test_pretraining_script_writes_a_loadable_model(tmp_path):
    out = tmp_path / "model"
    info = demo_model.main(["--out", str(out), "--corpus", "48", "--vae-steps", "2", "--unet-steps", "2",
                            "--batch-size", "4"])
    assert info["vae_steps"] == 2 and info["parameters"]["unet"] > 1e6 and info["scaling_factor"] > 0
    components = load_components(out)
    assert components.vae.config.scaling_factor == pytest.approx(info["scaling_factor"], rel=1e-3)
    assert next(components.unet.parameters()).dtype == torch.float32
    with pytest.raises(FileExistsError, match="already holds a model"):
        demo_model.main(["--out", str(out)])


def test_missing_shipped_model_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(components, "DEMO_MODEL", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="onlinemix pretrain-demo --out"):
        load_components("demo")


@pytest.mark.slow
def test_pretraining_teaches_the_unet_to_denoise_images_it_never_saw(drawn_timesteps):
    """What the demo pretraining is for: a denoiser of the generic corpus. From random weights, 40 steps of
    16 on 32 corpus images: on 16 other images, at timesteps no step drew, the U-Net's error under their
    captions is at least 10 % lower (24 % measured) and lower at every such timestep."""
    from onlinemix.training_noise import noise_prediction_error
    from tests.helpers import held_out

    images, captions = demo_model.render_corpus(48, seed=5)
    model = demo_model.demo_architecture(demo_model.corpus_tokenizer(captions), seed=0)
    means, stds = demo_model.encode_corpus(model.vae, images)
    model.vae.register_to_config(scaling_factor=float(1 / means.std()))
    moments = torch.cat([means, 2 * stds.log()], 1)[32:]
    ids = model.tokenizer(captions[32:], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids

    def error(timesteps):
        with torch.no_grad():
            return noise_prediction_error(model, model.text_encoder(ids)[0], moments, timesteps, seed=7)

    grid = list(range(13, 1000, 62))
    before = error(grid)
    demo_model.train_denoiser(model, means[:32], stds[:32], captions[:32], steps=40, batch_size=16, lr=1e-3, seed=0,
                              progress=False)
    kept = [k for k, t in enumerate(grid) if t in held_out(grid, drawn_timesteps)]
    assert len(kept) >= 5
    after = error([grid[k] for k in kept])
    assert float(after.mean()) < 0.9 * float(before[kept].mean()) and bool((after < before[kept]).all())
