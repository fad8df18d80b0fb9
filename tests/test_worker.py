import numpy as np
import pytest
import torch

from onlinemix import GeneratorPool, SampleRing
from onlinemix.generator.components import save_personalisation, tiny_components
from onlinemix.data import FileSplit
from onlinemix.generator.worker import DiffMixProducer, GeneratorSpec, TensorImages, to_uint8
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
    save_personalisation(tuned, components.unet, embeddings,
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
    producer = DiffMixProducer(spec(base, tuned), refs, CLASSES, "bird")("cpu")
    batch = producer()
    assert batch.images.shape == (4, 3, 24, 24) and batch.images.dtype == torch.uint8

    # Re-plan with the same seed and translate by hand: same labels, same images.
    np.random.seed(7)
    planner = Planner(refs.labels, "diff-mix", num_classes=4, seed=int(np.random.randint(0, 2**31 - 1)))
    requests = planner.take(4)
    assert batch.source.tolist() == [r.source for r in requests]
    assert batch.target.tolist() == [r.target for r in requests]
    assert batch.strength.tolist() == pytest.approx([r.strength for r in requests])
    assert all(refs.labels[r.reference] == r.source for r in requests)
    by_hand = producer.requests_to_images(requests)
    assert torch.equal(to_uint8(by_hand, 24), batch.images)
    prompts = [get_strategy("diff-mix").prompt_for(r.target, CLASSES, "bird") for r in requests]
    assert prompts[0].startswith("a photo of a <class_") and prompts[0].endswith("> bird")


@pytest.mark.parametrize("strategy", ["diff-gen", "real-aug", "real-mix", "da-fusion"])
def test_other_strategies_produce_consistent_labels(folders, strategy):
    base, tuned = folders
    finetuned = tuned if get_strategy(strategy).personalised else None
    batch = DiffMixProducer(spec(base, finetuned, strategy=strategy), references(), CLASSES, "bird")("cpu")()
    assert len(batch) == 4
    if not get_strategy(strategy).inter_class:
        assert torch.equal(batch.source, batch.target)
    assert {round(s, 4) for s in batch.strength.tolist()} <= set(get_strategy(strategy).strengths)


def test_pool_worker_fills_a_ring_with_labelled_samples(folders, tmp_path):
    base, tuned = folders
    paths = []
    refs = references()
    from PIL import Image
    for i in range(8):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(refs.images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    factory = DiffMixProducer(spec(base, tuned, strategy="diff-aug"), FileSplit(paths, refs.labels), CLASSES, "bird")
    with SampleRing.create(16, 24, producers=1, consumers=1) as ring:
        with GeneratorPool(ring, factory, "cpu"):
            batch = ring.take(8, timeout=120)
    assert len(batch) == 8
    assert torch.equal(batch.source, batch.target), "diff-aug keeps the class"
    assert {round(s, 4) for s in batch.strength.tolist()} <= {0.5, 0.7, 0.9}
    assert batch.images.float().std() > 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be >= 1"),
        (dict(guidance=0.5), "guidance must be >= 1"),
        (dict(resolution=30), "multiple of 8"),
        (dict(strengths=(0.5, 1.5)), r"\(0, 1\]"),
        (dict(strengths=(0.0,)), r"\(0, 1\]"),
        (dict(dtype="float8"), "dtype"),
        (dict(strategy="diff-mix", finetuned=None), "needs a personalised generator"),
        (dict(strategy="nope"), "Unknown strategy"),
    ],
)
def test_spec_errors(folders, kwargs, message):
    base, tuned = folders
    with pytest.raises(ValueError, match=message):
        DiffMixProducer(spec(base, tuned, **kwargs), references(), CLASSES, "bird")


def test_class_count_must_match_the_personalised_generator(folders):
    base, tuned = folders
    with pytest.raises(ValueError, match="knows 4 classes but the data set has 3"):
        DiffMixProducer(spec(base, tuned), TensorImages(references().images, [0, 0, 1, 1, 2, 2, 2, 2]),
                        CLASSES[:3], "bird")


def test_too_few_steps_for_a_strength(folders):
    base, tuned = folders
    with pytest.raises(ValueError, match="use at least 10 steps"):
        DiffMixProducer(spec(base, None, strategy="real-guidance", steps=4), references(), CLASSES, "bird")


def test_non_finite_images_are_dropped_and_counted(folders, caplog):
    base, tuned = folders
    producer = DiffMixProducer(spec(base, tuned), references(), CLASSES, "bird")("cpu")
    translate = producer.requests_to_images

    def one_nan(requests):
        images = translate(requests)
        images[1, 0, 3, 3] = float("nan")
        return images

    producer.requests_to_images = one_nan
    batch = producer()
    assert len(batch) == 3 and producer.non_finite == 1 and producer.dropped == 1
    assert "dropped 1 non-finite" in caplog.text
