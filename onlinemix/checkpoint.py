"""Training checkpoints that hold no pickled code: tensors, numbers, strings, lists and dicts only.

``load_checkpoint`` reads with ``torch.load(weights_only=True)``, which refuses anything
else, so resuming from a checkpoint made elsewhere cannot run code. Everything a
resume needs is stored in that vocabulary, the random states included (NumPy's
Mersenne Twister key as a tensor), so an interrupted run continues exactly.
"""
from __future__ import annotations

import glob
import os
import pickle
import random

import numpy as np
import torch


def rng_state() -> dict:
    """Python's, NumPy's and torch's (CPU) random states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    kind, key, position, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    np.random.set_state((numpy["kind"], numpy["key"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to a temporary file, then rename: a crash never leaves half a checkpoint.

    The temporary files a killed writer left next to ``path`` are removed first; a write that fails
    (``OSError``: the disk is full) removes its own and leaves ``path`` as it was.
    """
    for stale in glob.glob(f"{glob.escape(path)}.tmp-*"):
        pid = stale.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            os.remove(stale)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: no half-written file stays behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class CheckpointWriteError(OSError):
    """Checkpoint writes failed twice in a row (a full disk): the run stops, the last good checkpoint kept."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by ``save_checkpoint``, loaded without unpickling code.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file holds objects other than tensors and plain values, or cannot be read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {path!r} is not a file; give a last.pth or best.pth of a run.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):  # no pickle at all: a text file, say
            raise ValueError(f"{path!r} is not a readable torch checkpoint ({str(error).strip().splitlines()[0]}): "
                             "a copy cut short, or another kind of file. Resume from the run's other checkpoint "
                             "(last.pth or best.pth).") from None
        reason = str(error).strip().splitlines()[-1]
        raise ValueError(f"{path!r} holds objects other than tensors and plain values ({reason}); onlinemix "
                         "checkpoints hold none, so it was written by another program or an older onlinemix. "
                         "Start a new run (--initial-checkpoint loads its model weights).") from None
    except Exception as error:  # torch's readers on a cut or foreign file: RuntimeError, IndexError, EOFError ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path!r} is not a readable torch checkpoint ({reason}): a copy cut short, or another "
                         "kind of file. Resume from the run's other checkpoint (last.pth or best.pth).") from None
    return checkpoint
