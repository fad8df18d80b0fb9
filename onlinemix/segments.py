"""The lifecycle of onlinemix's shared-memory segments in ``/dev/shm``: create, open, unlink, sweep.

``SampleRing`` keeps the protocol of what lives *inside* its segment; this module keeps
what the operating system and CPython need around it:

- Segments are opened *untracked*. Before Python 3.13 every process that opens a
  segment registers it with its resource tracker, which unlinks it when that process
  exits, so a DataLoader worker ending would destroy the training process's ring.
  Cleanup is ours: the creating process unlinks, nobody else.
- Pages are reserved at creation (``posix_fallocate``): a sparse segment in a small
  ``/dev/shm`` (Docker's 64 MiB default) would die with SIGBUS on first write instead
  of failing with a message.
- Every segment starts with an int64 header whose word ``MAGIC_WORD`` holds its kind's
  magic number (``MAGICS``: a ring, a feedback block) and words ``OWNER_PID_WORD`` /
  ``OWNER_START_WORD`` its creator's pid and start time, so ``sweep_stale_segments`` can
  remove what a ``kill -9`` left, of every kind, and nothing whose owner still runs.
- Liveness is read from ``/proc`` with the process start time, so a reused pid does
  not keep a dead owner's segment alive.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import weakref
from multiprocessing import resource_tracker, shared_memory
from typing import Callable, Optional

import _posixshmem  # CPython's own binding; SharedMemory.unlink would also notify a resource tracker
import numpy as np

PREFIX = "onlinemix-"
SHM_DIR = "/dev/shm"
HEADER_WORDS = 16
MAGIC_WORD, OWNER_PID_WORD, OWNER_START_WORD = 0, 8, 9
RING_MAGIC = 0x6F6E6C696E656D78  # "onlinemx"
FEEDBACK_MAGIC = 0x6F6D66656564626B  # "omfeedbk"
# Every kind of segment onlinemix makes: a sweep judges each by its owner, whichever kind sweeps.
MAGICS = (RING_MAGIC, FEEDBACK_MAGIC)


def start_ticks(pid: int) -> Optional[int]:
    """Start time of a live, non-zombie process (clock ticks since boot), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # a zombie still answers kill(pid, 0)
        return None
    return int(fields[19])


def alive(pid: int, start: int) -> bool:
    """Whether process ``pid``, started at ``start`` ticks, still runs (pid reuse aware)."""
    if pid <= 0:
        return False
    if os.path.isdir("/proc"):
        return start_ticks(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def open_untracked(name: str, size: int = 0) -> shared_memory.SharedMemory:
    """Open (``size`` > 0: create) a segment that no resource tracker will destroy."""
    create = size > 0
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)
    shm = shared_memory.SharedMemory(name=name, create=create, size=size)
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def unlink(name: str, owner_pid: int) -> None:
    """Remove segment ``name`` if this process is ``owner_pid``; forked children never unlink."""
    if os.getpid() != owner_pid:
        return
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def available_bytes() -> Optional[int]:
    """Free bytes in ``/dev/shm``, or None where there is no such folder."""
    if not os.path.isdir(SHM_DIR):
        return None
    stat = os.statvfs(SHM_DIR)
    return stat.f_bavail * stat.f_frsize


def create_segment(name: str, size: int, too_small: Callable[[int], str]) -> shared_memory.SharedMemory:
    """Create an untracked segment with its pages reserved.

    Raises:
        ValueError: ``too_small(available bytes)`` when ``/dev/shm`` cannot hold ``size`` bytes.
    """
    available = available_bytes()
    if available is not None and size > available:
        raise ValueError(too_small(available))
    shm = open_untracked(name, size)
    if not hasattr(os, "posix_fallocate"):
        return shm
    try:
        os.posix_fallocate(shm._fd, 0, size)
    except OSError as error:
        shm.close()
        unlink(name, os.getpid())
        raise ValueError(too_small(available_bytes() or 0)) from error
    return shm


def sweep_stale_segments() -> list[str]:
    """Unlink onlinemix segments whose owner process is gone (e.g. after ``kill -9``).

    Only this user's names with the ``onlinemix-`` prefix are considered: those whose header carries
    one of ``MAGICS`` and names an owner that no longer runs, and those without a known
    header older than a minute (a creation that died half-way). Returns the names removed.
    """
    if not os.path.isdir(SHM_DIR):
        return []
    removed = []
    for entry in os.listdir(SHM_DIR):
        if not entry.startswith(PREFIX):
            continue
        path = os.path.join(SHM_DIR, entry)
        try:
            status = os.stat(path)
            if status.st_uid != os.getuid():  # another user's: not ours to judge, nor to remove
                continue
            with open(path, "rb") as f:
                header = np.frombuffer(f.read(HEADER_WORDS * 8), dtype=np.int64)
        except OSError:
            continue
        young = time.time() - status.st_mtime < 60
        if len(header) < HEADER_WORDS or int(header[MAGIC_WORD]) not in MAGICS:
            if young:  # possibly being created right now
                continue
        elif alive(int(header[OWNER_PID_WORD]), int(header[OWNER_START_WORD])):
            continue
        try:
            os.unlink(path)
            removed.append(entry)
        except OSError:  # gone already, or not ours after all: a sweep never stops a ring being made
            pass
    return removed


_OWNED: "weakref.WeakSet" = weakref.WeakSet()
_PREVIOUS_SIGTERM = None


def _on_sigterm(signum, frame):
    for owner in list(_OWNED):
        owner.close()
    signal.signal(signal.SIGTERM, _PREVIOUS_SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)


def close_on_sigterm(owner) -> None:
    """Call ``owner.close()`` on SIGTERM, unless the program already handles SIGTERM.

    ``owner`` is held weakly; SIGTERM is re-raised afterwards, so the process still ends.
    """
    global _PREVIOUS_SIGTERM
    _OWNED.add(owner)
    if _PREVIOUS_SIGTERM is not None:
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
            _PREVIOUS_SIGTERM = previous
    except ValueError:  # not the main thread: close(), garbage collection and exit still clean up
        pass
