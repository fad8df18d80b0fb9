"""``onlinemix invert`` on the toy set with the tiny model: the store, exact resume, bad input."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from onlinemix.generator.components import tiny_components
from onlinemix.generator.conditions import STORE, STORE_JSON
from onlinemix.invert import main, step_indices
from tests.test_finetune import losses


def invert(base, data_dir, out, *extra):
    argv = ["--model", base, "--data-dir", data_dir, "--out", str(out), "--resolution", "32", "--batch-size", "6",
            "--lr", "5e-2", "--metaclass", "shape", *extra]
    return main(argv)


def test_every_image_is_visited_once_per_epoch_across_processes():
    seen = np.concatenate([step_indices(10, step, 3, seed=1, rank=rank, world=2) for step in range(5)
                           for rank in range(2)])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10)), "two epochs of 10"
    assert np.array_equal(step_indices(10, 3, 3, seed=1, rank=1, world=2), step_indices(10, 3, 3, seed=1, rank=1,
                                                                                         world=2))
    assert not np.array_equal(seen[:10], seen[10:20]), "each epoch its own order"


def test_the_store_holds_one_condition_per_image_and_the_loss_falls(base, data_dir, tmp_path):
    result = invert(base, data_dir, tmp_path / "store", "--steps", "60", "--vectors", "3")
    curve = losses(tmp_path / "store")
    assert len(curve) == 60 and np.mean(curve[-15:]) < np.mean(curve[:15]), "the conditions learn"
    store = load_file(str(tmp_path / "store" / STORE))
    info = json.loads((tmp_path / "store" / STORE_JSON).read_text())
    width = tiny_components().unet.config.cross_attention_dim
    count = info["count"]
    assert store["conditions"].shape == (count, 3, width) and store["mean"].shape == (3, width)
    torch.testing.assert_close(store["mean"], store["conditions"].mean(0))
    assert store["ids"].tolist() == list(range(count)) and sorted(set(store["labels"].tolist())) == [0, 1, 2]
    assert info["resolution"] == 32 and info["vectors"] == 3 and info["training_images"]["count"] == count
    assert info["class_names"] and result["info"] == info
    assert not torch.allclose(store["conditions"][0], store["conditions"][1]), "each image its own condition"


def test_resume_continues_exactly(base, data_dir, tmp_path):
    invert(base, data_dir, tmp_path / "whole", "--steps", "8", "--checkpoint-every", "4")
    invert(base, data_dir, tmp_path / "cut", "--steps", "4", "--checkpoint-every", "4")
    result = invert(base, data_dir, tmp_path / "cut", "--steps", "8", "--checkpoint-every", "4", "--resume")
    assert list(result["losses"]) == [5, 6, 7, 8]
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(load_file(str(tmp_path / "cut" / STORE))["conditions"],
                               load_file(str(tmp_path / "whole" / STORE))["conditions"])


def test_bad_input_stops_before_any_work(base, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--vectors must lie in \[1, 77\]"):
        invert(base, data_dir, tmp_path / "a", "--vectors", "0")
    with pytest.raises(ValueError, match="multiple of 8"):
        invert(base, data_dir, tmp_path / "a", "--resolution", "30")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        invert(base, data_dir, tmp_path / "a", "--resume")
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        invert(base, data_dir, tmp_path / "busy")


@pytest.mark.parametrize("config", sorted(os.listdir(os.path.join("configs", "invert"))))
def test_every_invert_config_parses(config):
    from onlinemix.invert import build_parser, check_args
    from onlinemix.options import parse_with_config

    args = parse_with_config(build_parser(), ["--config", os.path.join("configs", "invert", config)])
    args.out = None  # the recipe's own folder may hold a store already
    with pytest.raises(ValueError, match="--out"):
        check_args(args)
    assert args.model and args.resolution % 8 == 0 and 1 <= args.vectors <= 77
