"""Strategy ``sgid``: the guidance mapping, weighted prompts, the caption store's checks, the producer, train.py."""
import json

import numpy as np
import pytest
import torch

import train
from onlinemix.data import load_splits
from onlinemix.generator.captions import (CaptionStore, captioned_guidance, captioned_prompt, check_caption_options,
                                          guidance_factor)
from onlinemix.generator.tiny import tiny_components
from onlinemix.generator.sampler import Sampler, weighted_tokens
from onlinemix.generator.worker import DiffusionProducerFactory, GeneratorSpec, to_uint8
from onlinemix.plan import Planner, get_strategy


def write_store(path, rows, **info):
    with open(path, "w") as f:
        json.dump({**info, "rows": rows}, f)
    return str(path)


@pytest.fixture(scope="module")
def captions(data_dir, tmp_path_factory):
    """A caption store of every toy training image, similarities spread over [0, 0.5]."""
    ids = load_splits(data_dir).train.image_ids()
    rows = [{"id": i, "caption": f"a shape number {n} on stripes", "similarity": round(0.5 * n / len(ids), 4)}
            for n, i in enumerate(ids)]
    return write_store(tmp_path_factory.mktemp("captions") / "captions.json", rows)


def test_guidance_mapping_is_the_reports_parabola_times_the_base_scale():
    s = np.array([0.0, 0.25, 0.3, 0.4, 0.5, 1.0])
    np.testing.assert_allclose(guidance_factor(s), [1.0, 1.25, 1.24, 1.16, 1.0, -1.0])
    np.testing.assert_allclose(captioned_guidance(s[:5], 7.5), [7.5, 9.375, 9.3, 8.7, 7.5])
    assert captioned_guidance(1.0, 7.5) == 1.0, "a negative factor turns guidance off, never below 1"
    assert captioned_guidance(-0.5, 7.5) == 1.0
    assert captioned_guidance(0.25, 1.0) == 1.25


def test_captioned_prompt_weights_the_label_above_the_caption():
    assert captioned_prompt("a red bird on water", "ember finch") == (
        ("a red bird on water", 0.9), (". A picture of", 1.0), ("ember finch", 1.5))
    assert captioned_prompt("x", "y", (1, 2))[2] == ("y", 2.0)
    for weights in ((0, 1.5), (0.9, -1), (1.0,), (1, 2, 3), (float("nan"), 1)):
        with pytest.raises(ValueError, match="both > 0"):
            captioned_prompt("x", "y", weights)


def test_weighted_tokens_match_the_tokenizer_and_keep_the_label_when_cut():
    tokenizer = tiny_components().tokenizer
    fragments = captioned_prompt("a red bird", "ember finch")
    ids, weights = weighted_tokens(tokenizer, fragments)
    plain = tokenizer("a red bird. A picture of ember finch", padding="max_length", max_length=77).input_ids
    assert ids == plain and len(weights) == 77
    caption_tokens = len(tokenizer("a red bird", add_special_tokens=False).input_ids)
    label_tokens = len(tokenizer("ember finch", add_special_tokens=False).input_ids)
    joint = len(tokenizer(". A picture of", add_special_tokens=False).input_ids)
    assert weights[0] == 1.0 and set(weights[1:1 + caption_tokens]) == {0.9}
    assert set(weights[1 + caption_tokens:1 + caption_tokens + joint]) == {1.0}
    label = slice(1 + caption_tokens + joint, 1 + caption_tokens + joint + label_tokens)
    assert set(weights[label]) == {1.5} and set(weights[label.stop:]) == {1.0}
    long_ids, long_weights = weighted_tokens(tokenizer, captioned_prompt("word " * 60, "ember finch"))
    assert len(long_ids) == 77 and long_ids[-1] == tokenizer.eos_token_id, "cut to the encoder's length"
    assert long_weights.count(1.5) == label_tokens, "the caption is cut, the label stays"
    with pytest.raises(ValueError, match="the text encoder reads 75"):
        weighted_tokens(tokenizer, (("a", 1.0), ("word " * 60, 1.5)))
    with pytest.raises(ValueError, match="must be > 0"):
        weighted_tokens(tokenizer, (("a", 0.0),))


def test_weighted_prompts_scale_the_encoders_outputs_and_are_cached():
    sampler = Sampler(tiny_components(seed=1), steps=2)
    fragments = captioned_prompt("a red bird", "ember finch")
    unweighted = captioned_prompt("a red bird", "ember finch", (1, 1))
    torch.testing.assert_close(sampler.embed([unweighted]), sampler.embed(["a red bird. A picture of ember finch"]),
                               rtol=0, atol=0)
    _, weights = weighted_tokens(sampler.components.tokenizer, fragments)
    expected = sampler.embed([unweighted])[0] * torch.tensor(weights)[:, None]
    torch.testing.assert_close(sampler.embed([fragments])[0], expected)
    calls = []
    sampler.components.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    again = sampler.embed([fragments, fragments, "a red bird. A picture of ember finch"])
    assert not calls, "weighted and plain prompts come from the cache"
    torch.testing.assert_close(again[0], expected)


def test_the_caption_store_refuses_bad_rows(tmp_path):
    good = {"id": "a/0.png", "caption": "a bird", "similarity": 0.3}
    store = CaptionStore.load(write_store(tmp_path / "ok.json", [good], captioner="x"))
    assert store.select(["a/0.png"])[0] == ["a bird"] and store.info == {"captioner": "x"}
    cases = {
        "lies in \\[-1, 1\\]": [dict(good, similarity=1.5)],
        "has similarity 'high'": [dict(good, similarity="high")],
        "has no caption": [dict(good, caption="  ")],
        "twice": [good, dict(good, caption="another")],
        "must hold id, caption and similarity": [{"id": "a/0.png", "caption": "a bird"}],
    }
    for message, rows in cases.items():
        with pytest.raises(ValueError, match=message):
            CaptionStore.load(write_store(tmp_path / "bad.json", rows))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="'rows' list"):
        CaptionStore.load(str(tmp_path / "list.json"))
    with pytest.raises(FileNotFoundError, match="onlinemix caption"):
        CaptionStore.load(str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="no caption for 2 of the 3 training images"):
        store.select(["a/0.png", "b/1.png", "c/2.png"])


def test_caption_options_are_checked():
    sgid, diffmix = get_strategy("sgid"), get_strategy("diffmix")
    with pytest.raises(ValueError, match="pass --captions"):
        check_caption_options(sgid, None, (0.9, 1.5))
    with pytest.raises(ValueError, match="reads no captions"):
        check_caption_options(diffmix, "c.json", (0.9, 1.5))
    with pytest.raises(ValueError, match="both > 0"):
        check_caption_options(sgid, "c.json", (0.9, 0))
    with pytest.raises(ValueError, match="use onlinemix.generator.captions.captioned_prompt"):
        sgid.prompt_for(0, ["a"], "bird")


def test_requests_are_intra_class_at_strength_point_three():
    labels = [0, 0, 1, 1, 2]
    requests = Planner(labels, "sgid", num_classes=3, seed=0).take(50)
    assert all(labels[r.reference] == r.source == r.target for r in requests)
    assert {r.strength for r in requests} == {0.3}


def test_producer_translates_with_weighted_captions_and_mapped_guidance(base, data_dir, captions):
    splits = load_splits(data_dir)
    spec = GeneratorSpec(model=base, strategy="sgid", captions=captions, steps=10, resolution=32, image_size=16,
                         batch_size=4, continuous=False, local_files_only=True, guidance=(2.0, 4.0))
    np.random.seed(5)
    factory = DiffusionProducerFactory(spec, splits.train, splits.class_names, "shape")
    producer = factory("cpu")
    batch = producer()
    np.random.seed(5)
    requests = Planner(splits.train.labels, "sgid", num_classes=3, seed=int(np.random.randint(0, 2**31 - 1)),
                       guidance=(2.0, 4.0)).take(4)
    assert batch.source.tolist() == batch.target.tolist() == [splits.train.labels[r.reference] for r in requests]
    assert batch.strength.tolist() == pytest.approx([0.3] * 4)
    texts, similarities = CaptionStore.load(captions).select(splits.train.image_ids())
    prompts = [captioned_prompt(texts[r.reference], splits.class_names[r.target]) for r in requests]
    guidance = [float(captioned_guidance(similarities[r.reference], r.guidance)) for r in requests]
    assert len(set(guidance)) > 1 and all(g > r.guidance for g, r in zip(guidance, requests))
    references = producer.load_references([r.reference for r in requests])
    by_hand = producer.sampler.translate(references, prompts, [r.strength for r in requests],
                                         [r.seed for r in requests], guidance=guidance)
    assert (to_uint8(by_hand, 16).int() - batch.images.int()).abs().max() <= 1, "the same images, up to rounding"


def test_a_store_missing_training_images_stops_the_factory(data_dir, tmp_path):
    splits = load_splits(data_dir)
    rows = [{"id": i, "caption": "a shape", "similarity": 0.3} for i in splits.train.image_ids()[1:]]
    spec = GeneratorSpec(model="tiny", strategy="sgid", captions=write_store(tmp_path / "c.json", rows))
    with pytest.raises(ValueError, match="no caption for 1 of the"):
        DiffusionProducerFactory(spec, splits.train, splits.class_names, "shape")


def test_train_stops_bad_caption_options_before_any_work(data_dir, tmp_path):
    common = ["--data-dir", data_dir, "--device", "cpu", "--aug", "sgid", "--gen-device", "cpu"]
    with pytest.raises(ValueError, match="pass --captions"):
        train.parse_args(common)
    bad = write_store(tmp_path / "bad.json", [{"id": "x", "caption": "a shape", "similarity": -3}])
    with pytest.raises(ValueError, match="lies in \\[-1, 1\\]"):
        train.parse_args([*common, "--captions", bad])
    with pytest.raises(ValueError, match="both > 0"):
        train.parse_args([*common, "--captions", bad, "--caption-weights", "0.9", "0"])
    with pytest.raises(ValueError, match="reads no captions"):
        train.parse_args([*common, "--aug", "realaug", "--captions", bad])


@pytest.mark.slow
def test_train_runs_sgid_and_stops_a_store_missing_images_first(base, data_dir, captions, tmp_path):
    common = ["--data-dir", data_dir, "--output", str(tmp_path), "--name", "run", "--model", "resnet18", "--img-size",
              "32", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu", "--aug", "sgid",
              "--gen-device", "cpu", "--gen-model", base, "--gen-resolution", "32", "--gen-steps", "10",
              "--gen-batch-size", "4", "--gen-dtype", "float32", "--ring-slots", "16", "--p", "0.5"]
    rows = json.loads(open(captions).read())["rows"][1:]
    with pytest.raises(ValueError, match="no caption for 1 of the"):
        train.main([*common, "--captions", write_store(tmp_path / "short.json", rows)])
    assert not (tmp_path / "run" / "last.pth").exists(), "no failed run trained"
    result = train.main([*common, "--captions", captions, "--caption-weights", "1.0", "2.0"])
    assert result["augmentation"]["replaced"] > 0
