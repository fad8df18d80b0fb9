import json
import os

import pytest
import torch
from peft import LoraConfig

from onlinemix.generator.adapters import DIFFMIX_EMBEDDINGS, add_tokens, attach_personalisation, save_personalisation
from onlinemix.generator.components import load_components
from onlinemix.generator.tiny import tiny_components
from onlinemix.generator.sampler import Sampler
from onlinemix.plan import get_strategy, placeholder_token

CLASSES = ["sooty tern", "arctic tern", "rock dove"]
SEEDS = [1, 2, 3]


def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def personalise(components, rank=4, alpha=8):
    """A LoRA with non-zero weights and one learned token per class, as fine-tuning would leave them."""
    components.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in components.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    width = components.text_encoder.get_input_embeddings().weight.shape[1]
    return {placeholder_token(i): torch.randn(width, generator=g) for i in range(len(CLASSES))}


def translate(components, tokens=None):
    prompts = [get_strategy("diffmix").prompt_for(t, CLASSES, "bird", tokens) for t in range(3)]
    return Sampler(components, steps=4).translate(images(), prompts, [0.7, 0.7, 0.9], SEEDS)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_components(seed=0).save(folder)
    return folder


def test_load_components_from_a_diffusers_folder(tiny_folder):
    loaded = load_components(tiny_folder, local_files_only=True)
    built = tiny_components(seed=0)
    torch.testing.assert_close(translate(loaded), translate(built), rtol=0, atol=1e-5)
    assert loaded.scheduler.config.algorithm_type == "dpmsolver++"
    assert type(loaded.unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"]).__name__ == "AttnProcessor2_0"


def test_load_errors(tmp_path, tiny_folder):
    with pytest.raises(FileNotFoundError, match="No model folder"):
        load_components(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    os.makedirs(broken / "unet")
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_components(str(broken))
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_components("someone/not-a-model-here", local_files_only=True)
    with pytest.raises(ValueError, match="sdpa"):
        load_components(tiny_folder, attention="flash")


def test_personalisation_round_trips_and_changes_the_output(tmp_path):
    tuned = tiny_components(seed=0)
    embeddings = personalise(tuned, rank=4, alpha=8)  # alpha != rank: the metadata must survive
    base = translate(tiny_components(seed=0), tokens=["tern"] * 3)  # the un-tuned model
    add_tokens(tuned, embeddings)
    expected = translate(tuned)
    save_personalisation(tmp_path, tuned, {"text_encoder": embeddings},
                         {"base_model": "tiny", "method": "ti_db", "class_names": CLASSES, "metaclass": "bird"})
    info = json.loads((tmp_path / "onlinemix.json").read_text())
    assert info["tokens"] == [placeholder_token(i) for i in range(3)] and info["class_names"] == CLASSES

    fresh = tiny_components(seed=0)
    loaded = attach_personalisation(fresh, tmp_path)
    assert loaded["tokens"] == info["tokens"]
    out = translate(fresh)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert (out - base).abs().max() > 1e-2, "personalisation must change the images"


def test_original_diffmix_outputs_load(tmp_path):
    tuned = tiny_components(seed=0)
    embeddings = personalise(tuned)
    save_personalisation(tmp_path, tuned, {}, {})
    os.remove(tmp_path / "onlinemix.json")
    torch.save(embeddings, tmp_path / DIFFMIX_EMBEDDINGS)
    fresh = tiny_components(seed=0)
    info = attach_personalisation(fresh, tmp_path)
    assert info["tokens"] == list(embeddings)
    ids = fresh.tokenizer.convert_tokens_to_ids(list(embeddings))
    torch.testing.assert_close(fresh.text_encoder.get_input_embeddings().weight[ids], torch.stack(list(embeddings.values())))


def test_personalisation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No personalised"):
        attach_personalisation(tiny_components(), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither"):
        attach_personalisation(tiny_components(), tmp_path)
    components = tiny_components()
    torch.save({"<class_0>": torch.zeros(16)}, tmp_path / DIFFMIX_EMBEDDINGS)
    with pytest.raises(ValueError, match="another base model"):
        attach_personalisation(components, tmp_path)
    torch.save({"a</w>": torch.zeros(32)}, tmp_path / DIFFMIX_EMBEDDINGS)
    with pytest.raises(ValueError, match="already exist"):
        attach_personalisation(tiny_components(), tmp_path)
