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

``SharedSegment`` is the base both kinds build on: creation with the header, attaching by
name once per process (again after a fork), pickling as the name, closing and unlinking.
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
MAGIC_WORD, LAYOUT_WORD, OWNER_PID_WORD, OWNER_START_WORD = 0, 1, 8, 9
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


class SharedSegment:
    """A named shared-memory segment of one of onlinemix's kinds; ``SampleRing`` and ``FeedbackBlock``
    are its subclasses.

    The creating process owns the segment: it unlinks it at ``close()``, when the object is garbage
    collected, at interpreter exit or on SIGTERM; nobody else does. The object pickles as its name,
    and any other process attaches lazily, once (again after a fork: the parent's mapping is not the
    child's). A subclass sets ``KIND`` (its name in messages), ``MAGIC`` and ``LAYOUT`` (checked on every
    attach), lays out its views in ``_views(shm, header)``, and may act once mapped (``_attached``) and
    before it detaches in its own process (``_detaching``).
    """

    KIND = "segment"
    MAGIC = 0
    LAYOUT = 0

    def __init__(self, name: str):
        self.name = name
        self._pid: Optional[int] = None
        self._shm: Optional[shared_memory.SharedMemory] = None
        self._owner = False
        self._closed = False
        self._finalizer: Optional[weakref.finalize] = None

    @classmethod
    def _new_segment(cls, name: str, size: int, too_small: Callable[[int], str],
                     header_words: dict) -> shared_memory.SharedMemory:
        """Sweep what dead owners left, then create segment ``name`` owned by this process, its header
        holding ``header_words`` (word index: value), the layout, the owner and, written last so that a
        sweep takes a half-made segment for an unknown young one, the magic number."""
        sweep_stale_segments()
        shm = create_segment(name, size, too_small)
        header = np.ndarray((HEADER_WORDS,), np.int64, shm.buf)
        header[:] = 0
        for word, value in {LAYOUT_WORD: cls.LAYOUT, **header_words}.items():
            header[word] = value
        header[OWNER_PID_WORD], header[OWNER_START_WORD] = os.getpid(), start_ticks(os.getpid()) or 0
        header[MAGIC_WORD] = cls.MAGIC
        del header
        return shm

    def _own(self, shm: shared_memory.SharedMemory) -> None:
        """Map the segment this process just made, and unlink it at close, collection, exit or SIGTERM."""
        self._map(shm)
        self._owner = True
        self._finalizer = weakref.finalize(self, unlink, self.name, os.getpid())
        close_on_sigterm(self)

    def __reduce__(self):
        return (type(self), (self.name,))

    def _missing_message(self) -> str:
        return f"No {self.KIND} named {self.name!r}: its owner closed it or exited."

    def _ensure_attached(self) -> None:
        """Map the segment into this process unless it is already (raises once closed)."""
        if self._closed:
            raise ValueError(f"{self.KIND} {self.name!r} is closed.")
        if self._pid == os.getpid():
            return
        if self._shm is not None:  # forked after attaching: the parent's mapping and claims are not ours
            self._forked()
        try:
            shm = open_untracked(self.name)
        except FileNotFoundError:
            raise FileNotFoundError(self._missing_message()) from None
        self._map(shm)

    def _forked(self) -> None:
        self._views_off()
        self._shm = None

    def _map(self, shm: shared_memory.SharedMemory) -> None:
        header = np.ndarray((HEADER_WORDS,), np.int64, shm.buf).copy()
        if header[MAGIC_WORD] != self.MAGIC or header[LAYOUT_WORD] != self.LAYOUT:
            shm.close()
            raise ValueError(f"Shared-memory segment {self.name!r} is not an onlinemix {self.KIND} of this version.")
        self._views(shm, header)
        self._shm, self._pid = shm, os.getpid()
        self._attached()

    def _views(self, shm: shared_memory.SharedMemory, header: np.ndarray) -> None:
        raise NotImplementedError

    def _attached(self) -> None:
        """After mapping: claims a subclass makes in this process."""

    def _detaching(self) -> None:
        """Before this process unmaps: releases a subclass made."""

    def _views_off(self) -> None:
        # Views into the buffer must go before the mapping is closed.
        for field in list(vars(self)):
            if isinstance(getattr(self, field), np.ndarray):
                delattr(self, field)

    def close(self) -> None:
        """Detach; the owner also unlinks the segment. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        shm, self._shm = self._shm, None
        if shm is not None and self._pid == os.getpid():
            self._detaching()
            self._views_off()
            shm.close()
        elif shm is not None:  # a fork's copy of the parent's mapping: drop the views, leave the mapping
            self._views_off()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
