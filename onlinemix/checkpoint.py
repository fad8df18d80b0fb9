"""Training checkpoints that hold no pickled code: tensors, numbers, strings, lists and dicts only; the
checks of a checkpoint a run resumes from or starts its weights from; and writing one on a full disk.

``load_checkpoint`` reads with ``torch.load(weights_only=True)``, which refuses anything
else, so resuming from a checkpoint made elsewhere cannot run code. Everything a
resume needs is stored in that vocabulary, the random states included (NumPy's
Mersenne Twister key as a tensor), so an interrupted run continues exactly.
"""
from __future__ import annotations

import glob
import logging
import os
import pickle
import random
import shutil

import numpy as np
import torch

logger = logging.getLogger("onlinemix")
# What train.py writes in a checkpoint and a resume needs.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best", "rng")


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


def resume_checkpoint(path: str, epochs: int) -> dict:
    """The checkpoint ``--resume`` names, checked before any work: written by train.py, not finished."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"--resume {path!r} is no train.py checkpoint: it lacks {missing}. Give a last.pth of a "
                         "run, or start from its model weights with --initial-checkpoint.")
    if checkpoint["epoch"] + 1 >= epochs:
        raise ValueError(f"--resume {path!r} has trained {checkpoint['epoch'] + 1} epochs already, and --epochs is "
                         f"{epochs}: nothing is left to train; pass a larger --epochs to train on.")
    return checkpoint


def load_model_state(model: torch.nn.Module, checkpoint: dict, path: str) -> None:
    """The weights of a ``resume_checkpoint`` into ``model``, refused in one sentence when they are another model's."""
    recorded = checkpoint.get("args", {})
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise ValueError(f"--resume {path!r} holds the weights of another model (it was trained with --model "
                         f"{recorded.get('model', '?')} on {recorded.get('data_dir', '?')}); resume with the same "
                         "--model and data set, or start a new run.") from None


def initial_weights(path: str) -> dict:
    """The tensors of ``--initial-checkpoint`` (safetensors, or a weights-only torch file: a plain state dict,
    or a train.py checkpoint's ``model``)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's and safetensors' errors on a cut, foreign or code-carrying file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--initial-checkpoint {path!r} cannot be read as weights ({reason}); pass a whole "
                         ".safetensors or .pth file of tensors.") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--initial-checkpoint {path!r} holds no state dict of tensors; pass model weights.")
    return state


def load_fitting_weights(model: torch.nn.Module, path: str, model_name: str) -> None:
    """The tensors of ``--initial-checkpoint`` whose name and shape fit ``model``: a checkpoint's classifier
    for another class count does not, and stays as built."""
    state = initial_weights(path)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not fitting:
        raise ValueError(f"--initial-checkpoint {path!r}: none of its {len(state)} tensors fits --model {model_name} "
                         "(another architecture?); pass weights of that model.")
    missing, _ = model.load_state_dict(fitting, strict=False)
    logger.info("loaded %s (%d tensors missing, e.g. the new classifier)", path, len(missing))


def save_or_warn(checkpoint: dict, path: str, failed_before: bool) -> bool:
    """Write ``checkpoint``; when the disk refuses (full, gone), keep the previous file, warn with the free
    space and go on, and stop the run cleanly when the write before failed too. Returns whether this one failed.

    Raises:
        CheckpointWriteError: this write and the one before failed.
    """
    try:
        save_checkpoint(checkpoint, path)
        return False
    except OSError as error:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        message = (f"could not write {path} ({error.strerror or error}; {free / 2**20:.0f} MiB free there); "
                   "the previous checkpoint is kept")
        if failed_before:
            raise CheckpointWriteError(f"{message}, and the write before failed too, so the run stops: free some "
                                       "space and continue with --resume on the last checkpoint.") from None
        logger.warning("%s; training goes on and writes again after the next epoch.", message)
        return True
