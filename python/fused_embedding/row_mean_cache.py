"""Cached per-row means of constant tables: axis 2 in O(B*L) instead of O(B*L*D).

On axis 2 the mean of row r is the same for every bag that uses r, so for a
table that does not change between calls (inference) a vector of row means
turns the op into a scalar gather. A stale vector would be a wrong answer, so a
table is cached only where its contents are proven constant, never from NumPy's
write flag: a writable view made before ``setflags(write=False)`` still writes
the table, and the flag can be turned back on. Two kinds of table qualify:

- **Frozen tables**, ``frozen_table(table)``: a copy made once into an immutable
  ``bytes`` object, handed back as a read-only array over it. No array can be
  made writable on a ``bytes`` buffer (``setflags(write=True)`` raises), so
  nothing writes it; more generally any array whose buffer belongs to ``bytes``
  (``np.frombuffer(some_bytes)``) qualifies. The entry keeps only the means
  (V float32): it is tied to the array that exports the ``bytes`` (the frozen
  table; every view of it keeps it alive) by a weak reference whose callback
  drops the entry when that array goes, before its memory can be freed, so an
  address reused later can never hit a stale entry, and the cache never keeps a
  table alive.
- **TensorFlow tensors' buffers** (what ``np.asarray(tensor)`` and the TF op's
  ``numpy_function`` hand over: NumPy arrays on memory TF owns). TF does not
  write a buffer that anything else references: an ``assign`` to a variable
  whose buffer is shared goes to a new buffer (copy on write). So an entry
  *pins* the buffer it was built from (holds a reference); that pin is what
  proves it unchanged, and a changed variable shows up at a new address.
  A buffer's lifetime is invisible from NumPy, so pins are bounded by where the
  table comes from instead: each *site* (the object the TF op was given, a
  ``tf.Variable`` or a tensor, from ``site_of``; one shared site for tables
  passed to the core op directly) pins at most the one buffer it last read,
  released when it reads another or when the source is garbage. The first call
  on a buffer only pins it and runs the direct kernel; the means are built when
  the same (pinned, so certainly unchanged) buffer comes again. A variable in
  TF's copy-on-read mode (after a ``tf.gather`` on it, which a Keras ``fit``
  step does) gives a fresh copy at every read: the cache never builds means
  there (a V*D pass per call would cost more than the direct kernel), and a site
  that got a new buffer at ``CHANGES_TO_GIVE_UP`` calls in a row pins nothing
  more: from its third call on such a variable, no copy is kept at all (its
  calls take the direct kernel until ``clear()``).

Everything else (an ordinary NumPy array, read-only or not, or memory owned by
a ``bytearray``, an ``mmap``, another library) takes the direct kernel every
call, which is always right. The cache is capped by bytes: ``MAX_BYTES`` bounds
the means it holds plus the table bytes it pins (counted in full, as if only
the cache held them), least recently used out first; a table whose entry alone
would exceed it is not cached. ``clear()`` drops everything.
"""
from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from collections import OrderedDict

import numpy as np

from .launch import CACHE_LINE_BYTES

# The bytes the cache may hold: means plus pinned TF buffers. 2 GiB fits the means of
# any table and a pinned 1M x 512 float32 table; a larger pinned table is not cached.
MAX_BYTES = 2 << 30
# The site of a table handed to the core op directly (not through the TF op).
ANONYMOUS_SITE = 0
# A site whose buffer was new at this many calls in a row pins no more: its reads are
# copies (TF's copy-on-read mode) or its table changes at every call, and either way
# a pin would only keep a stale buffer alive. One change (a variable assigned once,
# weights loaded) still lets the next calls build and use the means.
CHANGES_TO_GIVE_UP = 2

# Re-entrant: a weakref callback or finalizer can run inside a locked section (the
# garbage collector may run on any allocation there) and takes the lock again.
_lock = threading.RLock()
_entries: OrderedDict = OrderedDict()  # key -> _Entry, least recently used first
_sites: dict = {}  # TF site -> the key of the buffer it last read
_site_finalizers: dict = {}  # id(source) -> weakref.finalize releasing its site
_changes: dict = {}  # TF site -> how many calls in a row brought it a new buffer
_charged = 0  # bytes held: every entry's means plus every pinned table
_context = threading.local()  # .site: the TF op's site of the call on this thread
# The most recently used frozen entry as (weakref to the table, key, means), so that a
# call with the very same array object skips building the key's address:
# ``__array_interface__`` costs 20-40 us when the caches are cold, as much as the rest
# of the call's Python (benchmarks/NOTES.md). The same object always has the same
# buffer and base (NumPy can't re-point them); its shape, strides and dtype can be
# reassigned, so they are compared. A weak reference: it must not keep the table alive.
_last = None


# The type TF wraps a tensor's buffer in when it lends it to NumPy (eager tensors through
# np.asarray, a numpy_function's inputs), matched by name so this module needs no TF.
_TF_BUFFER_OWNER = ("builtins", "tensorflow_wrapper")
_FROZEN, _TF = "frozen", "tf"


class _Entry:
    __slots__ = ("means", "nbytes", "anchor", "pin", "sites")

    def __init__(self, means, nbytes, anchor=None, pin=None, sites=None):
        self.means = means  # [V] float32, or None for a TF buffer seen once (pinned only)
        self.nbytes = nbytes  # what it is charged against MAX_BYTES
        self.anchor = anchor  # frozen: weakref to the array exporting the bytes
        self.pin = pin  # TF: an array on the buffer, which keeps it unchanged
        self.sites = sites  # TF: the sites whose last read this buffer is


def frozen_table(table) -> np.ndarray:
    """A constant copy of ``table``, the way to have axis 2 read cached row means.

    Args:
      table: (V, D) array (float32, float16 or bfloat16; anything ``np.asarray``
        takes), copied once; later changes to it don't reach the copy.

    Returns:
      a read-only, C-contiguous (V, D) array of the same dtype and values, starting
      on a 64-byte line (``memory.empty_aligned``'s reason). Its memory is an immutable ``bytes`` object: no write can reach it
      and ``setflags(write=True)`` raises, so the axis-2 row means computed from it
      stay right for as long as it lives, and are dropped when it (and every view
      of it) is gone.
    """
    array = np.asarray(table)
    if array.dtype.hasobject:
        raise TypeError(f"frozen_table takes a numeric array, got dtype {array.dtype}")
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # bytes of any dtype, bfloat16 too
    raw, pad = _bytes_on_a_line(data)
    return np.ndarray(array.shape, array.dtype, buffer=raw, offset=pad)


def _address(raw: bytes) -> int:
    return np.frombuffer(raw, np.uint8).__array_interface__["data"][0] if raw else 0


def _bytes_on_a_line(data: np.ndarray) -> tuple[bytes, int]:
    """``data`` copied once into a new bytes object, and the offset at which it starts
    there: the first cache line inside the object's payload.

    The object is made zero-filled, 63 bytes longer than the data, and the data is
    written into it once, before anything else can reference it (no array, no hash of it
    exists yet); from then on nothing writes it. Writing it is the one way to choose
    where the data starts: bytes' payload sits after the object's header, wherever the
    allocator put the object.
    """
    raw = bytes(data.nbytes + CACHE_LINE_BYTES)
    start = _address(raw)
    pad = -start % CACHE_LINE_BYTES
    if data.nbytes:
        ctypes.memmove(start + pad, data.ctypes.data, data.nbytes)
    return raw, pad


def _constancy(table: np.ndarray):
    """(_FROZEN, the array exporting the bytes), (_TF, None), or None (may change).

    Follows the buffer to its owner (``.base`` of arrays, ``.obj`` of memoryviews).
    """
    anchor, owner = None, table
    while True:
        if isinstance(owner, np.ndarray):
            if owner.base is None:  # NumPy's own memory: any view of it may write it
                return None
            anchor, owner = owner, owner.base
        elif isinstance(owner, memoryview):
            owner = owner.obj
        else:
            break
    if type(owner) is bytes:  # exactly bytes: immutable, whatever its exporter's flags
        return _FROZEN, anchor
    if (type(owner).__module__, type(owner).__qualname__) == _TF_BUFFER_OWNER:
        return _TF, None
    return None


def is_constant(table: np.ndarray) -> bool:
    """True when the cache may keep ``table``'s row means (see the module doc)."""
    return _constancy(table) is not None


def _key(table: np.ndarray):
    return (table.__array_interface__["data"][0], table.shape, table.strides, table.dtype)


class at_site:
    """``with at_site(site):`` the TF op's calls on this thread come from ``site``."""
    __slots__ = ("site", "previous")

    def __init__(self, site: int):
        self.site = site

    def __enter__(self):
        self.previous = getattr(_context, "site", ANONYMOUS_SITE)
        _context.site = self.site

    def __exit__(self, *exc_info):
        _context.site = self.previous


def site_of(source) -> int:
    """The site for tables the TF op reads from ``source`` (the tf.Variable or tensor it
    was given): a source pins at most one buffer, released when the source is garbage.
    Sources that can't be weakly referenced share ANONYMOUS_SITE."""
    site = id(source)
    if site in _site_finalizers:  # registered, and alive: the caller holds it
        return site
    with _lock:
        if site not in _site_finalizers:
            try:
                finalizer = weakref.finalize(source, _release_site, site)
            except TypeError:
                return ANONYMOUS_SITE
            finalizer.atexit = False
            _site_finalizers[site] = finalizer
    return site


def row_means(table: np.ndarray, compute) -> np.ndarray | None:
    """The cached float32 row means of a constant table ([V]), computed by ``compute(table)``
    when due; None where the caller must run the direct kernel (a table that may change,
    a TF buffer seen for the first time, one over MAX_BYTES)."""
    global _last
    last = _last
    if (last is not None and last[0]() is table
            and last[1][1:] == (table.shape, table.strides, table.dtype)):
        return last[2]
    constancy = _constancy(table)
    if constancy is None:
        return None
    kind, anchor = constancy
    key = _key(table)
    means_bytes = table.shape[0] * 4
    if kind is _FROZEN:
        with _lock:
            entry = _entries.get(key)
            if entry is not None:
                _entries.move_to_end(key)
                _last = (weakref.ref(table), key, entry.means)
                return entry.means
        if means_bytes > MAX_BYTES:
            return None
        means = compute(table)
        with _lock:
            entry = _entries.get(key)
            if entry is None:  # (else another thread built it meanwhile)
                entry = _Entry(means, means.nbytes, anchor=weakref.ref(anchor, functools.partial(_anchor_died, key)))
                _insert(key, entry)
            _last = (weakref.ref(table), key, entry.means)
            return entry.means

    site = getattr(_context, "site", ANONYMOUS_SITE)
    with _lock:
        previous = _sites.get(site)
        if previous is not None and previous != key:
            _leave(site, previous)
            _changes[site] = _changes.get(site, 0) + 1
        if _changes.get(site, 0) >= CHANGES_TO_GIVE_UP:
            return None  # a new buffer at every call (copy-on-read): pin nothing
        entry = _entries.get(key)
        if entry is None:  # first sight: pin it, so that the next call can trust it
            if table.nbytes + means_bytes > MAX_BYTES:
                return None
            _sites[site] = key
            _insert(key, _Entry(None, table.nbytes, pin=table, sites={site}))
            return None
        entry.sites.add(site)
        _sites[site] = key
        _changes.pop(site, None)
        _entries.move_to_end(key)
        if entry.means is not None:
            return entry.means
    # Pinned since an earlier call: the buffer is the one that was seen then, unchanged.
    means = compute(table)
    with _lock:
        if _entries.get(key) is entry and entry.means is None:
            global _charged
            entry.means = means
            entry.nbytes += means.nbytes
            _charged += means.nbytes
            _trim()
    return means


def _insert(key, entry) -> None:
    global _charged
    _entries[key] = entry
    _charged += entry.nbytes
    _trim()


def _trim() -> None:
    while _charged > MAX_BYTES and _entries:
        key = next(iter(_entries))
        _evict(key, _entries[key])


def _evict(key, entry) -> None:
    global _charged, _last
    if _entries.get(key) is not entry:
        return
    del _entries[key]
    _charged -= entry.nbytes
    for site in entry.sites or ():
        if _sites.get(site) == key:
            del _sites[site]
    if _last is not None and _last[1] == key:
        _last = None


def _leave(site, key) -> None:
    """``site`` no longer reads the buffer at ``key``: unpinned once no site reads it."""
    if _sites.get(site) == key:
        del _sites[site]
    entry = _entries.get(key)
    if entry is not None and entry.sites is not None:
        entry.sites.discard(site)
        if not entry.sites:
            _evict(key, entry)


def _release_site(site) -> None:
    with _lock:
        _site_finalizers.pop(site, None)
        _changes.pop(site, None)
        key = _sites.get(site)
        if key is not None:
            _leave(site, key)


def _anchor_died(key, ref) -> None:
    with _lock:
        entry = _entries.get(key)
        if entry is not None and entry.anchor is ref:
            _evict(key, entry)


def clear() -> None:
    """Drop every cached table and every pin (the references that kept TF buffers alive)."""
    global _last, _charged
    with _lock:
        _entries.clear()
        _sites.clear()
        _changes.clear()
        _charged = 0
        _last = None


def cached_tables() -> int:
    """How many tables have their row means cached."""
    with _lock:
        return sum(entry.means is not None for entry in _entries.values())


def cached_bytes() -> int:
    """The bytes the cache holds, as charged against MAX_BYTES."""
    with _lock:
        return _charged
