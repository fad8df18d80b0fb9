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
