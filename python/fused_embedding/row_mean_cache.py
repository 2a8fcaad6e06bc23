"""Cached per-row means of constant tables: axis 2 in O(B*L) instead of O(B*L*D).

On axis 2 the mean of row r is the same for every bag that uses r, so for a
table that does not change between calls (inference) a vector of row means
turns the op into a scalar gather. A stale vector would be a wrong answer, so
a table is cached only when its contents provably cannot change while the
cache holds it:

- TensorFlow tensors (and so Keras/TF variables read through the TF op): NumPy
  sees them as arrays on memory TF owns (its buffer wrapper at the end of the
  ``.base`` chain), handed over read-only. TF doesn't write a tensor's buffer
  while anything references it: its copy-on-write sends an ``assign`` to a new
  buffer, so a changed variable shows up as a new address and is rebuilt.
- NumPy arrays marked read-only (``table.setflags(write=False)``) where every
  array and memoryview between them and the memory's owner is read-only too,
  and the owner is NumPy itself or an immutable ``bytes``. The flags are checked
  on every call: a call with the table writable drops its entry. Writing to it
  between two calls and making it read-only again before the next one can't be
  seen: call ``clear()`` after doing that. Memory owned by anything else (a
  ``bytearray``, an ``mmap``, another library) is never taken as constant.

Anything else (an ordinary writable NumPy array) takes the direct kernel every
call, which is always right. Entries hold a reference to their table (that is
what keeps the buffer unchanged); at most ``MAX_TABLES`` are kept, least
recently used first out, and ``clear()`` drops them all.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

MAX_TABLES = 4

_lock = threading.Lock()
_entries: OrderedDict = OrderedDict()  # key -> (table, means [V] float32)
# The most recently used entry as (table, key, means), so that a call with the very
# same array object skips building the key's address: ``__array_interface__`` costs
# 20-40 us when the caches are cold, as much as the rest of the call's Python
# (benchmarks/NOTES.md). The same object always has the same buffer (NumPy can't
# re-point it); its shape, strides and dtype can be reassigned, so they are compared.
_last = None


# The type TF wraps a tensor's buffer in when it lends it to NumPy (eager tensors through
# np.asarray, a numpy_function's inputs), matched by name so this module needs no TF.
_TF_BUFFER_OWNER = ("builtins", "tensorflow_wrapper")


def is_constant(table: np.ndarray) -> bool:
    """True when no write can reach table's buffer while a reference to it is held.

    Follows the buffer to its owner (``.base`` of arrays, ``.obj`` of memoryviews):
    ``table`` itself must be read-only; then either the owner is a TF tensor's
    buffer, or every array and memoryview on the way is read-only and the owner is
    NumPy (an array that owns its data) or ``bytes``.
    """
    if table.flags.writeable:
        return False
    every_step_read_only = True
    owner = table
    while True:
        if isinstance(owner, np.ndarray):
            every_step_read_only = every_step_read_only and not owner.flags.writeable
            if owner.base is None:  # NumPy's own memory
                return every_step_read_only
            owner = owner.base
        elif isinstance(owner, memoryview):
            every_step_read_only = every_step_read_only and owner.readonly
            owner = owner.obj
        else:
            break
    if (type(owner).__module__, type(owner).__qualname__) == _TF_BUFFER_OWNER:
        return True
    return every_step_read_only and isinstance(owner, bytes)


def _key(table: np.ndarray):
    return (table.__array_interface__["data"][0], table.shape, table.strides, table.dtype)


def row_means(table: np.ndarray, compute) -> np.ndarray | None:
    """The cached float32 row means of a constant table ([V]), computed by ``compute(table)``
    on a miss; None for a table that may change (the caller runs the direct kernel)."""
    global _last
    last = _last
    if (last is not None and last[0] is table and is_constant(table)
            and last[1][1:] == (table.shape, table.strides, table.dtype)):
        return last[2]
    key = _key(table)
    if not is_constant(table):
        with _lock:  # seen writable: whatever was cached at this address may be stale
            _entries.pop(key, None)
            if _last is not None and _last[0] is table:
                _last = None
        return None
    with _lock:
        entry = _entries.get(key)
        if entry is not None:
            _entries.move_to_end(key)
            _last = (table, key, entry[1])
            return entry[1]
    means = compute(table)
    with _lock:
        _entries[key] = (table, means)
        _last = (table, key, means)
        while len(_entries) > MAX_TABLES:
            _entries.popitem(last=False)
    return means


def clear() -> None:
    """Drop every cached table (and the references that kept them alive)."""
    global _last
    with _lock:
        _entries.clear()
        _last = None


def cached_tables() -> int:
    with _lock:
        return len(_entries)
