"""Host-side staging shared by the GPU backends: the empty-call rule and the bounds check.

Both GPU kernels lower one int64 error flag to the first bad flat position
(``b * L + l``) with an atomic min; ``NO_BAD_POSITION`` means none. What the host
does with that flag is the spec's ``BoundsCheck``:

- RAISE: read it back right after the launch (this waits for the kernel) and raise
  IndexError naming the id, its (row, column) and V before returning anything.
- DEFERRED: queue an asynchronous copy of the flag into pinned host memory and an
  event after it, and return at once. Every later GPU call first looks at the
  copies whose events have completed and raises the first bad id among them;
  ``synchronize()`` waits for all of them. The queue is bounded (MAX_PENDING): past
  it a call waits for the oldest check, so the host never runs unboundedly ahead of
  the errors. Nothing is dropped: a check leaves the queue only once read.
"""
from __future__ import annotations

import collections
import threading

from . import NO_BAD_POSITION, out_of_range_error

# Deferred checks in flight at most; past this a call waits for the oldest one.
MAX_PENDING = 256

DEFERRED_SUFFIX = " (reported by a deferred bounds check of an earlier call, whose result is not valid)"


def nothing_to_write(axis, batch: int, length: int) -> bool:
    """True when a call writes no element (B == 0, or axis 2 with L == 0): no zero-size grid is launched."""
    from ..semantics import Axis
    return batch == 0 or (axis is Axis.EMBEDDING and length == 0)


def raise_if_bad(first_bad: int, positions: int, error_at, suffix: str = "") -> None:
    """Raise ``error_at(first_bad)`` (an IndexError naming the id there) when a kernel's error
    flag value ``first_bad`` is a position below ``positions``; nothing when it says no bad id."""
    if first_bad < positions:
        error = error_at(int(first_bad))
        raise IndexError(str(error) + suffix) if suffix else error


def dense_error_at(ids_at, length: int, vocab: int):
    """``error_at`` for dense ids [B][L]: the flat position b * L + l, ``ids_at(row, col)`` the id there."""
    def error_at(position):
        row, col = divmod(position, length)
        return out_of_range_error(int(ids_at(row, col)), row, col, vocab)
    return error_at


class PendingCheck:
    """One deferred bounds check: a host copy of a call's flag, landing asynchronously.

    flag_host: a host array whose element 0 receives the flag; done(): True once the
    copy has landed; wait(): blocks until it has; positions and error_at as for
    ``raise_if_bad`` (error_at keeps the call's ids for the message); release(): gives
    the host slot back.
    """

    __slots__ = ("flag_host", "done", "wait", "positions", "error_at", "release")

    def __init__(self, flag_host, done, wait, positions, error_at, release=None):
        self.flag_host, self.done, self.wait = flag_host, done, wait
        self.positions, self.error_at, self.release = positions, error_at, release

    def raise_if_bad(self) -> None:
        first_bad = int(self.flag_host[0])
        if self.release is not None:
            self.release()
        raise_if_bad(first_bad, self.positions, self.error_at, DEFERRED_SUFFIX)


_lock = threading.Lock()
_pending: collections.deque = collections.deque()


def _pop_finished(wait_all: bool) -> list:
    """Remove and return, oldest first, the checks whose copies have landed (all, waiting, with wait_all)."""
    finished = []
    with _lock:
        while _pending and (wait_all or _pending[0].done()):
            check = _pending.popleft()
            if wait_all:
                check.wait()
            finished.append(check)
    return finished


def _read(finished) -> None:
    """Read every finished check (each gives its slot back), then raise the first bad one."""
    error = None
    for check in finished:
        try:
            check.raise_if_bad()
        except IndexError as exc:
            error = error or exc
    if error is not None:
        raise error


def raise_finished() -> None:
    """At the start of every GPU call: raise the first bad id of deferred calls that have
    finished. Checks are read in queue order; one still running keeps the later ones
    queued (they are read by a later call, or by synchronize())."""
    if _pending:
        _read(_pop_finished(wait_all=False))


def defer(check: PendingCheck) -> None:
    """Queue a call's check; when MAX_PENDING are queued, wait for the oldest first."""
    oldest = None
    with _lock:
        if len(_pending) >= MAX_PENDING:
            oldest = _pending.popleft()
        _pending.append(check)
    if oldest is not None:
        oldest.wait()
        _read([oldest])


def synchronize() -> None:
    """Wait for every deferred check and raise the first bad id among them."""
    _read(_pop_finished(wait_all=True))


def pending_checks() -> int:
    with _lock:
        return len(_pending)


class HostSlots:
    """Recycled one-element int64 host arrays for deferred flag copies (pinned on a GPU:
    an asynchronous copy needs page-locked memory), made by ``allocate()``."""

    def __init__(self, allocate):
        self._allocate, self._free, self._lock = allocate, [], threading.Lock()

    def take(self):
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._allocate()

    def give_back(self, slot) -> None:
        slot[0] = NO_BAD_POSITION
        with self._lock:
            self._free.append(slot)
