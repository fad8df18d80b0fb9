import numpy as np
import pytest
import torch

from onlinemix import GeneratorPool, SampleRing
from onlinemix.generator.adapters import attach_personalisation, save_personalisation
from onlinemix.generator.components import load_components
from onlinemix.generator.tiny import tiny_components
from onlinemix.data import FileSplit
from onlinemix.generator.sampler import denoising_steps
from onlinemix.generator.worker import DiffusionProducerFactory, GeneratorSpec, to_uint8
from tests.helpers import TensorImages
from onlinemix.plan import Planner, get_strategy, placeholder_token

CLASSES = ["tern", "gull", "dove", "crow"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-sd")
    components = tiny_components(seed=0)
    components.save(base)
    tuned = tmp_path_factory.mktemp("tuned")
    width = components.text_encoder.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(3)
    embeddings = {placeholder_token(i): torch.randn(width, generator=g) for i in range(len(CLASSES))}
    save_personalisation(tuned, components, {"text_encoder": embeddings},
                         {"base_model": str(base), "method": "ti", "class_names": CLASSES, "metaclass": "bird"})
    return str(base), str(tuned)


def references():
    g = torch.Generator().manual_seed(5)
    return TensorImages(torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8, generator=g), [0, 0, 1, 1, 2, 2, 3, 3])


def spec(base, tuned, **kw):
    return GeneratorSpec(**{**dict(model=base, finetuned=tuned, steps=4, resolution=32, image_size=24,
                                   batch_size=4, local_files_only=True), **kw})


def test_producer_output_matches_its_plan(folders):
    base, tuned = folders
    refs = references()
    np.random.seed(7)
    producer = DiffusionProducerFactory(spec(base, tuned, continuous=False), refs, CLASSES, "bird")("cpu")
    _, decoded = spy_on_unet_and_decode(producer)
    batch = producer()
    assert torch.equal(to_uint8(decoded[0][1], 24), batch.images)
    assert batch.images.shape == (4, 3, 24, 24) and batch.images.dtype == torch.uint8

    # Re-plan with the same seed and translate by hand: same labels, same images.
    np.random.seed(7)
    planner = Planner(refs.labels, "diffmix", num_classes=4, seed=int(np.random.randint(0, 2**31 - 1)))
    requests = planner.take(4)
    # Handed over by first step of the schedule (the strongest first), then in plan order.
    requests = sorted(requests, key=lambda r: -denoising_steps(4, r.strength))
    assert batch.source.tolist() == [r.source for r in requests]
    assert batch.target.tolist() == [r.target for r in requests]
    assert batch.strength.tolist() == pytest.approx([r.strength for r in requests])
    assert all(refs.labels[r.reference] == r.source for r in requests)
    prompts = [get_strategy("diffmix").prompt_for(r.target, CLASSES, "bird", producer.tokens) for r in requests]
    assert prompts[0].startswith("a photo of a <class_") and prompts[0].endswith("> bird")
    by_hand = producer.sampler.translate(producer.load_references([r.reference for r in requests]), prompts,
                                         [r.strength for r in requests], [r.seed for r in requests])
    torch.testing.assert_close(by_hand, decoded[0][1], rtol=0, atol=1e-4)


def spy_on_unet_and_decode(producer):
    """Record the rows of every U-Net call and what every decode hands back."""
    rows, decoded = [], []
    producer.sampler.components.unet.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    decode = producer.sampler.decode

    def recorded(trajectories):
        decoded.append(decode(trajectories))
        return decoded[-1]

    producer.sampler.decode = recorded
    return rows, decoded


@pytest.mark.parametrize("continuous", [True, False])
def test_continuous_batching_fills_every_unet_call_and_keeps_each_sample(folders, continuous):
    base, tuned = folders
    np.random.seed(5)
    producer = DiffusionProducerFactory(spec(base, tuned, steps=10, continuous=continuous), references(), CLASSES,
                                        "bird")("cpu")
    rows, decoded = spy_on_unet_and_decode(producer)
    batches = [producer() for _ in range(6)]
    if continuous:
        assert set(rows) == {2 * 4}, "every U-Net call runs the whole batch (twice, under guidance)"
        assert any(len(b) < 4 for b in batches), "samples are handed over as they finish"
    else:
        assert min(rows) < 2 * 4 and all(len(b) == 4 for b in batches)
    assert sum(len(b) for b in batches) == sum(len(r) for r, _ in decoded)
    # Each sample equals itself translated alone (the same request, seed and strength).
    for requests, images in list(decoded[:3]):
        for request, image in zip(requests, images):
            prompt = get_strategy("diffmix").prompt_for(request.target, CLASSES, "bird", producer.tokens)
            alone = producer.sampler.translate(producer.load_references([request.reference]), [prompt],
                                               [request.strength], [request.seed])
            torch.testing.assert_close(image[None], alone, rtol=0, atol=1e-4)


def test_references_are_encoded_once_per_worker(folders):
    base, tuned = folders
    np.random.seed(1)
    producer = DiffusionProducerFactory(spec(base, tuned, posterior_cache=8), references(), CLASSES, "bird")("cpu")
    loaded = []
    load = producer.load_references
    producer.load_references = lambda indices: (loaded.extend(indices), load(indices))[1]
    for _ in range(12):
        producer()
    sampler = producer.sampler
    assert len(loaded) == len(set(loaded)) <= 8, "each of the 8 references is loaded and encoded at most once"
    assert sampler.posterior_hits > 0 and sampler.posterior_hits + sampler.posterior_misses >= 12


@pytest.mark.parametrize("strategy", ["diffgen", "realaug", "realmix", "dafusion"])
def test_other_strategies_produce_consistent_labels(folders, strategy):
    base, tuned = folders
    finetuned = tuned if get_strategy(strategy).personalised else None
    batch = DiffusionProducerFactory(spec(base, finetuned, strategy=strategy, continuous=False), references(), CLASSES,
                                     "bird")("cpu")()
    assert len(batch) == 4
    if not get_strategy(strategy).inter_class:
        assert torch.equal(batch.source, batch.target)
    assert {round(s, 4) for s in batch.strength.tolist()} <= set(get_strategy(strategy).strengths)


@pytest.mark.slow
def test_pool_worker_fills_a_ring_with_labelled_samples(folders, tmp_path):
    base, tuned = folders
    paths = []
    refs = references()
    from PIL import Image
    for i in range(8):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(refs.images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    factory = DiffusionProducerFactory(spec(base, tuned, strategy="diffaug"), FileSplit(paths, refs.labels), CLASSES, "bird")
    with SampleRing.create(16, 24, producers=1, consumers=1) as ring:
        with GeneratorPool(ring, factory, "cpu"):
            batch = ring.take(8, timeout=120)
    assert len(batch) == 8
    assert torch.equal(batch.source, batch.target), "diffaug keeps the class"
    assert {round(s, 4) for s in batch.strength.tolist()} <= {0.5, 0.7, 0.9}
    assert batch.images.float().std() > 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be >= 1"),
        (dict(guidance=0.5), "Guidance scales must be >= 1"),
        (dict(resolution=30), "multiple of 8"),
        (dict(strengths=(0.5, 1.5)), r"\(0, 1\]"),
        (dict(strengths=(0.0,)), r"\(0, 1\]"),
        (dict(dtype="float8"), "dtype"),
        (dict(deep_cache=0), "deep_cache must be >= 1"),
        (dict(posterior_cache=-1), "posterior_cache must be >= 0"),
        (dict(compile="fast"), "compile must be None or one of"),
        (dict(attention="flash"), "attention must be 'sdpa' or 'xformers'"),
        (dict(compile="default", deep_cache=2), "compile and deep_cache > 1 do not mix"),
        (dict(strategy="diffmix", finetuned=None), "needs a personalised generator"),
        (dict(strategy="nope"), "Unknown strategy"),
    ],
)
def test_spec_errors(folders, kwargs, message):
    base, tuned = folders
    with pytest.raises(ValueError, match=message):
        DiffusionProducerFactory(spec(base, tuned, **kwargs), references(), CLASSES, "bird")


def test_class_count_must_match_the_personalised_generator(folders):
    base, tuned = folders
    with pytest.raises(ValueError, match="knows 4 classes but the data set has 3"):
        DiffusionProducerFactory(spec(base, tuned), TensorImages(references().images, [0, 0, 1, 1, 2, 2, 2, 2]),
                        CLASSES[:3], "bird")


def test_too_few_steps_for_a_strength(folders):
    base, tuned = folders
    with pytest.raises(ValueError, match="use at least 10 steps"):
        DiffusionProducerFactory(spec(base, None, strategy="realguidance", steps=4), references(), CLASSES, "bird")


def test_non_finite_images_are_dropped_and_counted(folders, caplog):
    base, tuned = folders
    producer = DiffusionProducerFactory(spec(base, tuned, continuous=False), references(), CLASSES, "bird")("cpu")
    decode = producer.sampler.decode

    def one_nan(trajectories):
        requests, images = decode(trajectories)
        images[1, 0, 3, 3] = float("nan")
        return requests, images

    producer.sampler.decode = one_nan
    batch = producer()
    assert len(batch) == 3 and producer.non_finite == 1 and producer.dropped == 1
    assert "dropped 1 non-finite" in caplog.text


@pytest.fixture(scope="module")
def ti_db(folders, tmp_path_factory):
    """A tokens + LoRA personalisation (the paper's ti_db) of the tiny base model, with non-zero LoRA weights."""
    from peft import LoraConfig

    base, _ = folders
    components = tiny_components(seed=0)
    components.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(4)  # a module fixture: its own seed, whichever test makes it first
    with torch.no_grad():
        for name, p in components.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=g)
    width = components.text_encoder.get_input_embeddings().weight.shape[1]
    embeddings = {placeholder_token(i): torch.randn(width, generator=g) for i in range(len(CLASSES))}
    folder = tmp_path_factory.mktemp("ti-db")
    save_personalisation(folder, components, {"text_encoder": embeddings},
                         {"base_model": base, "method": "ti_db", "class_names": CLASSES, "metaclass": "bird"})
    return str(folder)


@pytest.mark.parametrize("strategy", ["realmix", "realaug", "realgen", "realguidance"])
def test_base_model_strategies_ignore_the_personalised_generator(folders, ti_db, strategy):
    base, _ = folders
    steps = 10 if strategy == "realguidance" else 4
    with pytest.warns(UserWarning, match="un-tuned base model"):
        factory = DiffusionProducerFactory(spec(base, ti_db, strategy=strategy, steps=steps), references(), CLASSES, "bird")
    np.random.seed(3)
    producer = factory("cpu")
    components = producer.sampler.components
    assert not getattr(components.unet, "peft_config", None), "no LoRA on the base model"
    assert "<class_0>" not in components.tokenizer.get_vocab(), "no learned tokens"
    np.random.seed(3)
    plain = DiffusionProducerFactory(spec(base, None, strategy=strategy, steps=steps), references(), CLASSES, "bird")("cpu")
    assert torch.equal(producer().images, plain().images)


def test_diff_mix_runs_the_personalised_generator(folders, ti_db):
    base, _ = folders
    producer = DiffusionProducerFactory(spec(base, ti_db), references(), CLASSES, "bird")("cpu")
    assert producer.tokens[0] == "<class_0>"
    # The LoRA is folded into the U-Net's weights: no adapter layers left, the same outputs as with them.
    fused = producer.sampler.components.unet
    assert not getattr(fused, "peft_config", None)
    assert not any("lora" in name for name, _ in fused.named_parameters())
    with_adapters = load_components(base)
    attach_personalisation(with_adapters, ti_db)
    latents, states = torch.randn(2, 4, 4, 4), torch.randn(2, 77, fused.config.cross_attention_dim)
    with torch.no_grad():
        expected = with_adapters.unet(latents, 500, encoder_hidden_states=states).sample
        torch.testing.assert_close(fused(latents, 500, encoder_hidden_states=states).sample, expected, rtol=0, atol=1e-5)
        with_adapters.unet.disable_lora()
        assert not torch.allclose(with_adapters.unet(latents, 500, encoder_hidden_states=states).sample, expected,
                                  atol=1e-3), "the LoRA changes the U-Net"


def test_da_fusion_needs_a_tokens_only_generator(folders, ti_db):
    base, tuned = folders
    with pytest.raises(ValueError, match="made with method 'ti_db'.*onlinemix finetune --method ti"):
        DiffusionProducerFactory(spec(base, ti_db, strategy="dafusion"), references(), CLASSES, "bird")
    DiffusionProducerFactory(spec(base, tuned, strategy="dafusion"), references(), CLASSES, "bird")  # method ti


def test_real_filtering_needs_the_clip_filter(folders):
    base, _ = folders
    with pytest.raises(ValueError, match="real-gen with the CLIP filter.*--clip-filter"):
        DiffusionProducerFactory(spec(base, None, strategy="realfilter"), references(), CLASSES, "bird")


def test_a_generator_tuned_on_other_training_images_is_refused(folders, tmp_path):
    base, _ = folders
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    files = FileSplit([f"/data/train/{CLASSES[y]}/{i:03d}.png" for i, y in enumerate(labels)], labels)
    tuned_on = files.subset([0, 2, 4, 6])  # e.g. a 1-shot subset drawn with another seed than the classifier's
    components = tiny_components(seed=0)
    width = components.text_encoder.get_input_embeddings().weight.shape[1]
    save_personalisation(tmp_path, components, {"text_encoder": {placeholder_token(i): torch.zeros(width)
                                                            for i in range(4)}},
                         {"method": "ti", "class_names": CLASSES, "training_images": tuned_on.fingerprint(),
                          "data": {"shots": 1, "data_seed": 0}})
    with pytest.raises(ValueError, match=r"fine-tuned on other training images \(4 images.*than this run trains "
                                         r"on \(4 images.*'shots': 1, 'data_seed': 0"):
        DiffusionProducerFactory(spec(base, str(tmp_path)), files.subset([1, 2, 4, 6]), CLASSES, "bird")
    DiffusionProducerFactory(spec(base, str(tmp_path)), files.subset([6, 4, 2, 0]), CLASSES, "bird")  # the same images
    DiffusionProducerFactory(spec(base, str(tmp_path), strategy="realmix"), files, CLASSES, "bird")  # base model: no check


def test_channels_last_keeps_the_outputs(folders):
    base, tuned = folders
    batches = []
    for channels_last in (False, True):
        np.random.seed(2)
        producer = DiffusionProducerFactory(spec(base, tuned, continuous=False, channels_last=channels_last),
                                            references(), CLASSES, "bird")("cpu")
        _, decoded = spy_on_unet_and_decode(producer)
        producer()
        batches.append(decoded[0][1])
    conv = producer.sampler.components.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(batches[1], batches[0], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_compiled_unet_keeps_the_outputs(folders):
    base, tuned = folders
    batches = []
    for compile_mode in (None, "default"):
        np.random.seed(2)
        producer = DiffusionProducerFactory(spec(base, tuned, compile=compile_mode), references(), CLASSES,
                                            "bird")("cpu")
        _, decoded = spy_on_unet_and_decode(producer)
        for _ in range(3):
            producer()
        batches.append(torch.cat([images for _, images in decoded]))
    assert type(producer.sampler.components.unet).__name__ == "OptimizedModule"
    torch.testing.assert_close(batches[1], batches[0], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def accelerator(tmp_path_factory):
    """A random LoRA file standing in for a few-step acceleration adapter (other modules than the personalisation's)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_components(seed=0).unet
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_v", "proj_in"])
    unet.add_adapter(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    folder = tmp_path_factory.mktemp("accelerator")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet)), weight_name="tiny-accelerator.safetensors",
        unet_lora_adapter_metadata=config.to_dict())
    return str(folder / "tiny-accelerator.safetensors")


@pytest.mark.parametrize("scheduler", ["lcm", "tcd", "ddim-trailing"])
def test_acceleration_lora_next_to_the_personalisation_equals_diffusers(folders, ti_db, accelerator, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    from onlinemix.generator.adapters import attach_accelerator
    from onlinemix.generator.components import sampling_scheduler

    base, _ = folders
    np.random.seed(4)
    producer = DiffusionProducerFactory(spec(base, ti_db, scheduler=scheduler, accelerator=accelerator,
                                             accelerator_weight=0.7, steps=4, guidance=2.0), references(), CLASSES,
                                        "bird")("cpu")
    assert type(producer.sampler.components.scheduler).__name__ == {
        "lcm": "LCMScheduler", "tcd": "TCDScheduler", "ddim-trailing": "DDIMScheduler"}[scheduler]
    # diffusers' pipeline on the same adapters, unfused, with the same scheduler and generators.
    reference = load_components(base)
    attach_personalisation(reference, ti_db)
    attach_accelerator(reference, accelerator, weight=0.7)
    assert sorted(reference.unet.peft_config) == ["accelerator", "personalised"]
    reference.scheduler = sampling_scheduler(scheduler, reference.scheduler.config)
    pipe = reference.pipeline(StableDiffusionImg2ImgPipeline)
    pipe.set_progress_bar_config(disable=True)
    images = producer.load_references([0, 5])
    prompts = [get_strategy("diffmix").prompt_for(t, CLASSES, "bird", producer.tokens) for t in (2, 1)]
    for strength in (0.5, 0.9):
        expected = pipe(prompt=prompts, image=images, strength=strength, num_inference_steps=4, guidance_scale=2.0,
                        generator=[torch.Generator().manual_seed(s) for s in (8, 9)], output_type="pt").images
        ours = producer.sampler.translate(images, prompts, [strength] * 2, [8, 9])
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    # Without the accelerator the translation differs: the adapter is in the fused weights.
    reference.unet.set_adapters(["personalised"])
    plain = pipe(prompt=prompts, image=images, strength=0.9, num_inference_steps=4, guidance_scale=2.0,
                 generator=[torch.Generator().manual_seed(s) for s in (8, 9)], output_type="pt").images
    assert not torch.allclose(plain, ours, atol=1e-3)


def test_accelerator_errors(folders, accelerator, tmp_path):
    from onlinemix.generator.adapters import attach_accelerator

    base, _ = folders
    with pytest.raises(ValueError, match="needs the scheduler it was distilled for"):
        spec(base, None, strategy="realmix", accelerator=accelerator)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        spec(base, None, strategy="realmix", scheduler="euler")
    with pytest.raises(ValueError, match="accelerator_weight must be > 0"):
        spec(base, None, strategy="realmix", accelerator=accelerator, scheduler="lcm", accelerator_weight=0)
    with pytest.raises(FileNotFoundError, match="No acceleration LoRA at"):
        attach_accelerator(tiny_components(), tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="No acceleration LoRA at"):  # in the training process, before workers
        DiffusionProducerFactory(spec(base, None, strategy="realmix", scheduler="lcm",
                                      accelerator=str(tmp_path / "missing.safetensors")), references(), CLASSES, "bird")


def test_xformers_without_the_package_is_refused_before_any_work(folders):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    base, _ = folders
    with pytest.raises(ValueError, match=r"needs the xformers package: pip install 'onlinemix\[xformers\]'"):
        spec(base, None, strategy="realmix", attention="xformers")
