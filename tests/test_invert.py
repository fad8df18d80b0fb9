"""``onlinemix invert`` on the toy set with the tiny model: groups, the store, what the objective is for,
exact resume, bad input."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from onlinemix.generator.tiny import tiny_components
from onlinemix.generator.conditions import STORE, STORE_JSON
from onlinemix.invert import build_parser, group_batch, image_groups, main
from tests.helpers import held_out
from tests.test_finetune import losses


def invert(base, data_dir, out, *extra):
    argv = ["--model", base, "--data-dir", data_dir, "--out", str(out), "--resolution", "32", "--group-size", "12",
            "--batch-size", "6", "--updates-per-image", "2", "--metaclass", "shape", *extra]
    return main(argv)


def test_the_defaults_are_the_official_recipe():
    args = build_parser().parse_args([])
    assert (args.lr, args.weight_decay, args.group_size, args.batch_size) == (3e-2, 1e-2, 100, 50)
    assert (args.updates_per_image, args.vectors, args.init) == (3000, 5, "random")


def test_groups_cover_every_image_and_each_epoch_visits_a_group_once():
    groups = image_groups(24, 10)
    assert [len(g) for g in groups] == [8, 8, 8] and np.array_equal(np.concatenate(groups), np.arange(24))
    assert [len(g) for g in image_groups(120, 100)] == [60, 60]
    epochs = [np.concatenate([group_batch(10, step, 4, seed=1, group=0) for step in range(e * 3, e * 3 + 3)])
              for e in range(2)]
    assert all(sorted(e) == list(range(10)) for e in epochs), "3 batches of 3-4 per epoch, every image once"
    assert not np.array_equal(*epochs), "each epoch its own order"
    assert not np.array_equal(group_batch(10, 0, 4, seed=1, group=0), group_batch(10, 0, 4, seed=1, group=1))
    assert np.array_equal(group_batch(10, 4, 4, seed=1, group=0), group_batch(10, 4, 4, seed=1, group=0))


def test_the_store_holds_one_condition_per_image(base, data_dir, tmp_path):
    result = invert(base, data_dir, tmp_path / "store", "--vectors", "3")
    rows = losses(tmp_path / "store")
    assert len(rows) == 2 * (2 * 2), "2 groups of 12, 2 batches per epoch, 2 updates per image"
    assert list(result["losses"]) == [(g, s) for g in range(2) for s in range(1, 5)]
    store = load_file(str(tmp_path / "store" / STORE))
    info = json.loads((tmp_path / "store" / STORE_JSON).read_text())
    width = tiny_components().unet.config.cross_attention_dim
    count = info["count"]
    assert store["conditions"].shape == (count, 3, width) and store["mean"].shape == (3, width)
    torch.testing.assert_close(store["mean"], store["conditions"].mean(0))
    assert store["ids"].tolist() == list(range(count)) and sorted(set(store["labels"].tolist())) == [0, 1, 2]
    assert info["resolution"] == 32 and info["vectors"] == 3 and info["training_images"]["count"] == count
    assert (info["groups"], info["steps_per_group"], info["init"]) == (2, [4, 4], "random")
    assert info["class_names"] and result["info"] == info
    assert not torch.allclose(store["conditions"][0], store["conditions"][1]), "each image its own condition"


def test_random_conditions_start_as_the_official_linear_layer(base, data_dir, tmp_path):
    """One group of 24 trained with a learning rate too small to move them: the conditions stay uniform
    in +-1/sqrt(24), as PyTorch initialises a linear layer over 24 one-hot inputs."""
    invert(base, data_dir, tmp_path / "store", "--group-size", "24", "--lr", "1e-12", "--weight-decay", "0")
    conditions = load_file(str(tmp_path / "store" / STORE))["conditions"]
    bound = 1 / np.sqrt(24)
    assert conditions.abs().max() <= bound and conditions.abs().max() > 0.95 * bound
    assert abs(float(conditions.std()) - bound / np.sqrt(3)) < 0.01, "the uniform distribution's spread"
    linear = torch.nn.Linear(24, 8, bias=False)
    assert float(linear.weight.detach().abs().max()) <= bound


def test_resume_continues_exactly(base, data_dir, tmp_path, monkeypatch):
    """Stopped at step 6 of the second group's 8 (the first group finished, a checkpoint at step 4), resumed:
    the rows of steps 5 and 6 are trained and logged again, once."""
    import onlinemix.invert as module

    common = ("--updates-per-image", "4", "--checkpoint-every", "4")
    invert(base, data_dir, tmp_path / "whole", *common)
    log = module.append_group_loss

    def stop_at_step_6(out, group, step, loss):
        log(out, group, step, loss)
        if (group, step) == (1, 6):
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "append_group_loss", stop_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        invert(base, data_dir, tmp_path / "cut", *common)
    monkeypatch.setattr(module, "append_group_loss", log)
    with pytest.raises(ValueError, match=r"started with --updates-per-image 4 \(now 5\)"):
        invert(base, data_dir, tmp_path / "cut", "--updates-per-image", "5", "--checkpoint-every", "4", "--resume")
    assert os.path.isfile(tmp_path / "cut" / "groups" / "group-00000.safetensors")
    result = invert(base, data_dir, tmp_path / "cut", *common, "--resume")
    assert list(result["losses"]) == [(1, s) for s in range(5, 9)]
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(load_file(str(tmp_path / "cut" / STORE))["conditions"],
                               load_file(str(tmp_path / "whole" / STORE))["conditions"])


def test_bad_input_stops_before_any_work(base, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--vectors must lie in \[1, 77\]"):
        invert(base, data_dir, tmp_path / "a", "--vectors", "0")
    with pytest.raises(ValueError, match="multiple of 8"):
        invert(base, data_dir, tmp_path / "a", "--resolution", "30")
    with pytest.raises(FileNotFoundError, match="holds no finished group or checkpoint"):
        invert(base, data_dir, tmp_path / "a", "--resume")
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        invert(base, data_dir, tmp_path / "busy")
    with pytest.raises(ValueError, match="--updates-per-image"):
        invert(base, data_dir, tmp_path / "a", "--updates-per-image", "0")
    with pytest.raises(ValueError, match="--weight-decay"):
        invert(base, data_dir, tmp_path / "a", "--weight-decay", "-1")


@pytest.mark.parametrize("config", sorted(os.listdir(os.path.join("configs", "invert"))))
def test_every_invert_config_parses(config):
    from onlinemix.invert import build_parser, check_args
    from onlinemix.options import parse_with_config

    args = parse_with_config(build_parser(), ["--config", os.path.join("configs", "invert", config)])
    args.out = None  # the recipe's own folder may hold a store already
    with pytest.raises(ValueError, match="--out"):
        check_args(args)
    assert args.model and args.resolution % 8 == 0 and 1 <= args.vectors <= 77



@pytest.mark.slow
def test_learned_conditions_predict_the_noise_better_at_timesteps_never_trained_on(demo_images, drawn_timesteps,
                                                                                   tmp_path):
    """What inversion is for: each image's condition makes the frozen U-Net reconstruct that image. On the
    shipped demo generator, 12 images, 30 updates each at the official recipe's rates: the U-Net's error at
    timesteps no training step drew, on fresh noise, is at least 3 % below the starting conditions' (4.6 %
    measured), and below it at every such timestep."""
    from onlinemix.data import load_splits
    from onlinemix.generator.components import load_components
    from onlinemix.invert import encode_images, starting_conditions
    from onlinemix.training_noise import noise_prediction_error

    main(["--model", "demo", "--dataset", "demo", "--data-dir", demo_images, "--resolution", "64", "--metaclass",
          "bird", "--group-size", "12", "--batch-size", "12", "--updates-per-image", "30", "--out",
          str(tmp_path / "store")])
    timesteps = held_out(range(13, 1000, 62), drawn_timesteps)
    assert len(timesteps) >= 6, "30 steps of 12 draw about 300 of the 1 000 timesteps"
    components = load_components("demo")
    train = load_splits(demo_images, dataset="demo").train
    moments = encode_images(components, train, np.arange(len(train)), 64)
    start = starting_conditions(components, len(train), init="random", vectors=5, group_size=12, metaclass="bird",
                                seed=0, group=0)
    learned = load_file(str(tmp_path / "store" / STORE))["conditions"]
    before = noise_prediction_error(components, start, moments, timesteps, seed=123)
    after = noise_prediction_error(components, learned, moments, timesteps, seed=123)
    assert float(after.mean()) < 0.97 * float(before.mean()), (before, after)
    assert bool((after < before).all()), (timesteps, before, after)
