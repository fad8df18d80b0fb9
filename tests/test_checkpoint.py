import random

import numpy as np
import pytest
import torch

from onlinemix.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_random_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint({"rng": [rng_state()], "epoch": 4, "args": {"lr": 0.1, "aug": "diffmix"}}, str(tmp_path / "c.pth"))
    expected = (random.random(), np.random.normal(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = load_checkpoint(str(tmp_path / "c.pth"))
    set_rng_state(state["rng"][0])
    assert (random.random(), np.random.normal(), torch.rand(1).item()) == expected
    assert state["epoch"] == 4 and state["args"] == {"lr": 0.1, "aug": "diffmix"}
    assert not list(tmp_path.glob("*.tmp-*")), "written through a temporary file"


class Payload:
    """Stands for any object a pickle could carry."""


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path):
    torch.save({"model": {}, "extra": Payload()}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="holds objects other than tensors and plain values"):
        load_checkpoint(str(tmp_path / "foreign.pth"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_checkpoint(str(tmp_path / "missing.pth"))


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    import errno

    path = str(tmp_path / "last.pth")
    save_checkpoint({"epoch": 1}, path)

    def full_disk(state, f):
        with open(f, "wb") as half:
            half.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and not list(tmp_path.glob("*.tmp-*"))
