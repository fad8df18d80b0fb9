"""``onlinemix generate`` on a local Ray instance (2 CPUs, CPU actors) with the tiny model: the set, its
manifest, an exact regeneration, ``--aug replay`` reading it back, and the errors."""
import json
import os

import numpy as np
import torch
import pytest
from PIL import Image

import train
from onlinemix.generate import main, parse_args

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'onlinemix[ray]')")


def options(data_dir, base, out, *extra):
    return ["--data-dir", data_dir, "--aug", "realmix", "--gen-model", base, "--count", "10", "--gen-batch-size", "4",
            "--gen-steps", "4", "--gen-resolution", "32", "--gen-dtype", "float32", "--strengths", "0.5", "0.75",
            "--gpus", "0", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def made(data_dir, base, tmp_path_factory):
    """A set of 10 samples in tasks of 4, made on a local Ray instance."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = tmp_path_factory.mktemp("sets") / "a"
    result = main(options(data_dir, base, out))
    yield out, result
    ray.shutdown()


def pixels(root, path):
    return np.asarray(Image.open(os.path.join(root, "data", path)))


@pytest.mark.slow
def test_generate_writes_the_set_its_manifest_and_meta(made):
    out, result = made
    assert result == {"out": str(out), "samples": 10, "written": 10, "tasks": 3}
    manifest = json.load(open(out / "manifest.json"))
    samples = manifest["samples"]
    assert manifest["finished"] and [s["number"] for s in samples] == list(range(10))
    assert [s["task"] for s in samples] == [0] * 4 + [1] * 4 + [2] * 2
    assert {s["strength"] for s in samples} <= {0.5, 0.75} and all(s["written"] for s in samples)
    assert all(s["reference"].startswith("class_") and s["partner"] is None for s in samples)
    lines = open(out / "meta.csv").read().splitlines()
    assert len(lines) == 11 and sorted(line.split(",")[-1] for line in lines[1:]) == sorted(s["path"] for s in samples)
    assert pixels(out, samples[0]["path"]).shape == (32, 32, 3)
    assert manifest["options"]["seed"] == 0 and "out" not in manifest["options"]


@pytest.mark.slow
def test_the_manifest_regenerates_the_same_images_bit_for_bit(made, tmp_path):
    out, _ = made
    again = tmp_path / "again"
    result = main(["--regenerate", str(out), "--out", str(again), "--workers", "2", "--gpus", "0"])  # other actors
    samples = json.load(open(out / "manifest.json"))["samples"]
    assert result["written"] == 10 and json.load(open(again / "manifest.json"))["samples"] == samples
    assert all(np.array_equal(pixels(out, s["path"]), pixels(again, s["path"])) for s in samples)


def test_the_plan_follows_the_seed(data_dir, base, tmp_path):
    from onlinemix.data import load_splits
    from onlinemix.generate import planned_samples
    from onlinemix.options import data_options, generator_factory
    from onlinemix.sources import SampleRecorder

    args = parse_args(options(data_dir, base, tmp_path / "a"))
    splits = load_splits(args.data_dir, **data_options(args))
    planner = generator_factory(args, splits, str(tmp_path), image_size=32).planner
    recorder, ids = SampleRecorder(str(tmp_path / "r"), splits.class_names), splits.train.image_ids()

    def plan(seed):
        return planned_samples(planner, count=6, seed=seed, batch_size=4, ids=ids, recorder=recorder)

    assert plan(0) == plan(0) and plan(0) != plan(1)
    assert [s["task"] for s in plan(0)] == [0, 0, 0, 0, 1, 1]


@pytest.mark.slow
def test_train_replays_the_set(made, data_dir, tmp_path):
    out, _ = made
    result = train.main(["--data-dir", data_dir, "--output", str(tmp_path), "--name", "run", "--model", "resnet18",
                         "--img-size", "32", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu",
                         "--aug", "replay", "--replay-dir", str(out), "--p", "0.5"])
    assert result["augmentation"]["replaced"] > 0


def test_bad_settings_stop_before_any_work(data_dir, base, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    with pytest.raises(ValueError, match="is not empty"):
        parse_args(options(data_dir, base, full))
    with pytest.raises(ValueError, match="--count"):
        parse_args(options(data_dir, base, tmp_path / "a", "--count", "0"))
    with pytest.raises(ValueError, match="a set needs a saved model"):
        parse_args(options(data_dir, "tiny", tmp_path / "a"))
    with pytest.raises(ValueError, match="filter when you train"):
        parse_args(options(data_dir, base, tmp_path / "a", "--clip-filter", "clip"))
    with pytest.raises(ValueError, match="pass only --out, --cluster, --workers and --gpus .got --count, --seed"):
        parse_args(["--regenerate", str(tmp_path), "--out", str(tmp_path / "b"), "--count", "3", "--seed", "2"])
    with pytest.raises(FileNotFoundError, match="No manifest.json"):
        parse_args(["--regenerate", str(tmp_path), "--out", str(tmp_path / "b")])
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not an onlinemix generate manifest"):
        parse_args(["--regenerate", str(tmp_path), "--out", str(tmp_path / "b")])
    with pytest.raises(ConnectionError, match="Nothing answers"):
        parse_args(options(data_dir, base, tmp_path / "a", "--cluster", "127.0.0.1:9"))


@pytest.mark.slow
def test_a_regeneration_on_other_data_is_refused(made, tmp_path):
    from onlinemix.data.toy import write_toy_dataset

    out, _ = made
    other = tmp_path / "toy"
    write_toy_dataset(str(other), classes=3, train_per_class=5, val_per_class=1, test_per_class=1)
    manifest = json.load(open(out / "manifest.json"))
    manifest["options"]["data_dir"] = str(other)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="fingerprints differ"):
        main(["--regenerate", str(moved), "--out", str(tmp_path / "b"), "--gpus", "0"])


def test_a_format_1_manifest_reads_its_interpolation_weights_as_the_partners(tmp_path):
    """Format 1 held the reference condition's weight; the same set, read now, holds the partner's."""
    from onlinemix.generate import FORMAT, read_manifest

    samples = [dict(number=0, partner="a/1.png", alpha=0.8), dict(number=1, partner=None, alpha=1.0)]
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "onlinemix-generate/1", "samples": samples}))
    manifest = read_manifest(str(tmp_path))
    assert manifest["format"] == FORMAT and [s["alpha"] for s in manifest["samples"]] == [pytest.approx(0.2), 0.0]


def test_a_task_renders_the_same_bits_whatever_its_actor_rendered_before(data_dir, base, tmp_path):
    """Regeneration spreads tasks over other actors, so a task's bits must not depend on the tasks before it
    (here one that shares a reference: with a posterior cache, the other reference would be encoded alone,
    and a convolution over one image need not give the bits it gives inside a batch)."""
    from onlinemix.data import load_splits
    from onlinemix.options import data_options, generator_factory
    from onlinemix.plan import Request

    args = parse_args(options(data_dir, base, tmp_path / "a"))
    splits = load_splits(args.data_dir, **data_options(args))
    factory = generator_factory(args, splits, str(tmp_path), image_size=32)
    label = splits.train.labels
    task = [Request(reference=0, source=int(label[0]), target=1, strength=0.75, seed=7),
            Request(reference=9, source=int(label[9]), target=0, strength=0.5, seed=8)]
    before = [Request(reference=i, source=int(label[i]), target=2, strength=0.5, seed=i) for i in (0, 3, 15, 20)]
    alone, _ = factory("cpu").render(task)
    producer = factory("cpu")
    producer.render(before)
    after, _ = producer.render(task)
    assert torch.equal(alone, after)
