import os
import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_shared_memory():
    """The suite must leave no onlinemix segment behind in /dev/shm."""
    def ours():
        return {n for n in os.listdir("/dev/shm") if n.startswith("onlinemix-")} if os.path.isdir("/dev/shm") else set()

    before = ours()
    yield
    left = ours() - before
    assert not left, f"tests left shared-memory segments behind: {sorted(left)}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny model saved as a diffusers folder (the base of fine-tuning and inversion tests)."""
    from onlinemix.generator.tiny import tiny_components

    folder = tmp_path_factory.mktemp("base") / "tiny"
    tiny_components(seed=0).save(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A toy data set of 3 classes, 8 training images each."""
    from onlinemix.data.toy import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(str(root), classes=3, train_per_class=8, val_per_class=1, test_per_class=1)
    return str(root)


@pytest.fixture()
def drawn_timesteps(monkeypatch):
    """Every timestep training draws (evaluation passes its own); ``helpers.held_out`` picks the others."""
    from onlinemix import training_noise

    drawn, original = set(), training_noise.TrainingNoise.__call__

    def recording(self, latents, generator, timesteps=None):
        out = original(self, latents, generator, timesteps)
        if timesteps is None:
            drawn.update(out.timesteps.tolist())
        return out

    monkeypatch.setattr(training_noise.TrainingNoise, "__call__", recording)
    return drawn


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    """A demo world of one training image per species (12)."""
    from onlinemix.data.demo_world import write_demo_world

    root = tmp_path_factory.mktemp("world")
    write_demo_world(str(root), train_per_class=1, val_per_class=1, test_per_class=1)
    return str(root)
