"""Strategy ``diffinversion``: requests, perturbed conditions, the store's checks, the producer, train.py."""
import json

import numpy as np
import pytest
import torch

import train
from onlinemix.data import load_splits
from onlinemix.generator.conditions import STORE_JSON, ConditionStore
from onlinemix.generator.worker import DiffusionProducerFactory, GeneratorSpec, to_uint8
from onlinemix.invert import main as invert
from onlinemix.plan import Planner, Request

LABELS = [0, 0, 0, 1, 1, 2, 2, 2]


@pytest.fixture(scope="module")
def store(base, data_dir, tmp_path_factory):
    """A real store: ``onlinemix invert`` on the toy set with the tiny model, a few steps at 32 px."""
    out = tmp_path_factory.mktemp("store")
    invert(["--model", base, "--data-dir", data_dir, "--out", str(out), "--resolution", "32", "--batch-size", "6",
            "--group-size", "24", "--updates-per-image", "1", "--vectors", "3", "--metaclass", "shape"])
    return str(out)


def test_requests_take_an_image_of_their_class_and_its_label():
    planner = Planner(LABELS, "diff-inversion", num_classes=3, seed=0)
    requests = planner.take(200)
    assert all(LABELS[r.reference] == r.source == r.target for r in requests)
    assert {r.strength for r in requests} == {1.0}
    assert len({r.reference for r in requests}) == len(LABELS), "every image is drawn"


def test_by_default_each_condition_is_mixed_with_another_of_its_class_at_weight_0_1():
    """The method's sampler: (1 - 0.1)·c + 0.1·c_partner, the partner any image of the class."""
    requests = Planner(LABELS, "diffinversion", num_classes=3, seed=0).take(300)
    assert {r.alpha for r in requests} == {0.1}
    assert all(LABELS[r.partner] == LABELS[r.reference] for r in requests)
    assert any(r.partner != r.reference for r in requests) and any(r.partner == r.reference for r in requests)
    plain = Planner(LABELS, "diffinversion", num_classes=3, interpolation=(0, 0), seed=0).take(50)
    assert {r.alpha for r in plain} == {0.0}


def test_interpolation_draws_a_partner_of_the_class_and_alpha_in_range():
    requests = Planner(LABELS, "diffinversion", num_classes=3, interpolation=(0.3, 0.6), seed=1).take(300)
    assert all(LABELS[r.partner] == LABELS[r.reference] for r in requests)
    alphas = np.array([r.alpha for r in requests])
    assert alphas.min() >= 0.3 and alphas.max() <= 0.6 and alphas.std() > 0.05
    assert {r.partner for r in Planner(LABELS, "diffmix", num_classes=3, seed=1).take(50)} == {-1}


def test_guidance_is_drawn_per_request_from_the_set():
    requests = Planner(LABELS, "diffinversion", num_classes=3, guidance=(1, 2, 4), seed=2).take(300)
    counts = {g: sum(r.guidance == g for r in requests) for g in (1.0, 2.0, 4.0)}
    assert sum(counts.values()) == 300 and min(counts.values()) > 60
    one = Planner(LABELS, "diffmix", num_classes=3, guidance=(5,), seed=2).take(20)
    plain = Planner(LABELS, "diffmix", num_classes=3, seed=2).take(20)
    assert {r.guidance for r in one} == {5.0} and {r.guidance for r in plain} == {None}
    assert [r.reference for r in one] == [r.reference for r in plain], "one scale draws nothing: the same stream"


def test_bad_interpolation_and_guidance_are_refused():
    with pytest.raises(ValueError, match=r"0 <= LOW <= HIGH <= 1"):
        Planner(LABELS, "diffinversion", interpolation=(0.2, 1.5))
    with pytest.raises(ValueError, match=r"0 <= LOW <= HIGH <= 1"):
        Planner(LABELS, "diffinversion", interpolation=(0.8, 0.2))
    with pytest.raises(ValueError, match="needs an inverted strategy"):
        Planner(LABELS, "diffaug", interpolation=(0.2, 0.8))
    with pytest.raises(ValueError, match="must be >= 1"):
        Planner(LABELS, "diffmix", guidance=(0.5, 2))


def test_perturbed_conditions():
    g = torch.Generator().manual_seed(0)
    conditions = torch.randn(4, 2, 3, generator=g)
    store = ConditionStore(conditions, conditions.mean(0), torch.tensor([0, 0, 1, 1]), {})
    plain, mixed = Request(1, 0, 0, 1.0, 7), Request(0, 0, 0, 1.0, 7, partner=1, alpha=0.25)
    assert torch.equal(store.perturbed([plain], 0.0)[0], conditions[1])
    torch.testing.assert_close(store.perturbed([mixed], 0.0)[0], 0.75 * conditions[0] + 0.25 * conditions[1])
    unmixed = Request(0, 0, 0, 1.0, 7, partner=1, alpha=0.0)
    assert torch.equal(store.perturbed([unmixed], 0.0)[0], conditions[0])
    noisy = store.perturbed([plain, plain, Request(1, 0, 0, 1.0, 8)], 0.5)
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2]), "noise follows the seed"
    deviation = torch.cat([store.perturbed([Request(1, 0, 0, 1.0, s)], 0.5)[0] - conditions[1] for s in range(200)])
    assert deviation.mean().abs() < 0.05 and deviation.std().item() == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        store.perturbed([plain], -0.1)


def test_a_store_of_another_data_set_or_resolution_is_refused(store, data_dir, tmp_path):
    splits = load_splits(data_dir)
    info = ConditionStore.check(store, splits.train, splits.class_names, 32)
    assert info["resolution"] == 32
    with pytest.raises(ValueError, match="learned at 32 px, but the generator samples at 64 px"):
        ConditionStore.check(store, splits.train, splits.class_names, 64)
    with pytest.raises(ValueError, match="knows 3 classes but the data set has 4"):
        ConditionStore.check(store, splits.train, [*splits.class_names, "extra"], 32)
    fewer = load_splits(data_dir, shots=4).train
    with pytest.raises(ValueError, match="ids or labels differ"):
        ConditionStore.check(store, fewer, splits.class_names, 32)
    with pytest.raises(FileNotFoundError, match="holds no condition store"):
        ConditionStore.check(str(tmp_path), splits.train, splits.class_names, 32)
    other = json.loads(open(f"{store}/{STORE_JSON}").read())
    other["training_images"] = {"count": len(splits.train), "sha256": "0" * 64}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / STORE_JSON).write_text(json.dumps(other))
    (tmp_path / "other" / "conditions.safetensors").write_bytes(open(f"{store}/conditions.safetensors", "rb").read())
    with pytest.raises(ValueError, match="learned on other training images"):
        ConditionStore.check(str(tmp_path / "other"), splits.train, splits.class_names, 32)


def test_spec_refuses_missing_store_and_negative_lambda(store):
    with pytest.raises(ValueError, match="pass --inversion"):
        GeneratorSpec(model="tiny", strategy="diffinversion")
    with pytest.raises(ValueError, match="must be >= 0"):
        GeneratorSpec(model="tiny", strategy="diffinversion", inversion=store, inversion_noise=-1)
    with pytest.raises(ValueError, match="needs an inverted strategy"):
        GeneratorSpec(model="tiny", strategy="realmix", inversion_interpolation=(0.1, 0.9))
    assert GeneratorSpec(model="tiny", strategy="diffinversion", inversion=store).guidance_scales == (2.0, 3.0, 4.0)
    assert GeneratorSpec(model="tiny", strategy="diffmix", finetuned="x").guidance_scales == (7.5,)
    assert GeneratorSpec(model="tiny", strategy="realmix", guidance=(3, 5)).guidance_scales == (3.0, 5.0)


def test_producer_generates_from_the_perturbed_conditions(base, data_dir, store):
    splits = load_splits(data_dir)
    spec = GeneratorSpec(model=base, strategy="diffinversion", inversion=store, steps=3, resolution=32, image_size=16,
                         batch_size=4, continuous=False, local_files_only=True, inversion_interpolation=(0.2, 0.8))
    np.random.seed(3)
    producer = DiffusionProducerFactory(spec, splits.train, splits.class_names, "shape")("cpu")
    batch = producer()
    np.random.seed(3)
    requests = Planner(splits.train.labels, "diffinversion", num_classes=3, seed=int(np.random.randint(0, 2**31 - 1)),
                       guidance=(2, 3, 4), interpolation=(0.2, 0.8)).take(4)
    labels = [splits.train.labels[r.reference] for r in requests]
    assert batch.source.tolist() == batch.target.tolist() == labels
    assert batch.strength.tolist() == [1.0] * 4 and batch.images.shape == (4, 3, 16, 16)
    stored = ConditionStore.load(store)
    by_hand = producer.sampler.generate(stored.perturbed(requests, 0.1), [r.seed for r in requests], height=32,
                                        width=32, guidance=[r.guidance for r in requests], unconditional=stored.mean)
    assert (to_uint8(by_hand, 16).int() - batch.images.int()).abs().max() <= 1, "the same images, up to rounding"


@pytest.mark.slow
def test_train_runs_diffinversion_and_stops_bad_options_first(base, data_dir, store, tmp_path):
    common = ["--data-dir", data_dir, "--output", str(tmp_path), "--name", "run", "--model", "resnet18", "--img-size",
              "32", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu", "--aug",
              "diff-inversion", "--gen-device", "cpu", "--gen-model", base, "--gen-resolution", "32", "--gen-steps", "2",
              "--gen-batch-size", "4", "--gen-dtype", "float32", "--ring-slots", "16", "--p", "0.5"]
    with pytest.raises(ValueError, match="pass --inversion"):
        train.main(common)
    with pytest.raises(FileNotFoundError, match="holds no condition store"):
        train.main([*common, "--inversion", str(tmp_path / "none")])
    with pytest.raises(ValueError, match=r"0 <= LOW <= HIGH <= 1"):
        train.main([*common, "--inversion", store, "--inversion-interpolation", "0.5", "1.2"])
    with pytest.raises(ValueError, match="learned at 32 px"):
        train.main([*common, "--inversion", store, "--gen-resolution", "64"])
    assert not (tmp_path / "run" / "last.pth").exists(), "no failed run trained"
    result = train.main([*common, "--inversion", store, "--inversion-noise", "0.2"])
    assert result["augmentation"]["replaced"] > 0


def test_train_refuses_a_guidance_scale_below_one_before_any_work(data_dir):
    with pytest.raises(ValueError, match="Guidance scales must be >= 1"):
        train.parse_args(["--data-dir", data_dir, "--device", "cpu", "--aug", "diffmix", "--gen-device", "cpu",
                          "--guidance", "7.5", "0.5"])
