"""What the processes of a multi-process run (torchrun, ``accelerate launch``) tell each other.

Every function takes accelerate's ``PartialState`` and works unchanged in a single process.
"""
from __future__ import annotations

import os
from typing import Callable, Optional


def gather(state, value) -> list:
    """``value`` of every process, in process order."""
    from accelerate.utils import gather_object

    return gather_object([value]) if state.num_processes > 1 else [value]


def local_world(state) -> int:
    """Processes on this node (torchrun and ``accelerate launch`` say how many)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))


def made_on_node_main(state, make: Callable[[], object], name: Callable[[object], str]) -> tuple[Optional[object], str]:
    """``make()`` on each node's local rank 0, its ``name(made)`` handed to every rank of the node.

    A refusal there (``ValueError``, ``FileNotFoundError``) is raised on every rank of the node, so no
    rank waits for a resource that will never come.

    Returns:
        ``(made, name)``: what ``make`` made on local rank 0 (None on the other ranks), and its name.
    """
    made = error = None
    if state.is_local_main_process:
        try:
            made = make()
        except (ValueError, FileNotFoundError) as failure:
            error = failure
    shared = gather(state, (name(made) if made is not None else None, str(error) if error else None))
    if error is not None:
        raise error
    made_name, failure = shared[state.process_index - state.local_process_index]
    if failure:
        raise ValueError(f"local rank 0 of this node failed: {failure}")
    return made, made_name
