"""The "cpu" backend: Numba kernels, parallel over bags, on host arrays."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

from .. import launch, row_mean_cache
from ..semantics import Axis, table_format, output_shape
from . import raise_first_bad_id
from .numpy import host_memory_available

DEVICE = "cpu"


def unavailable_reason() -> str | None:
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        return f"numba is not installed ({exc})"
    return None


def memory_limit_bytes() -> int:
    return host_memory_available()


# Numba's "workqueue" threading layer (its fallback where neither TBB nor OpenMP
# loads) aborts the whole process when two Python threads launch parallel
# kernels at once, as TF's py_function threads and thread pools do; TBB and
# OpenMP are thread-safe. Launches are serialised under workqueue only. The
# layer is picked at the first parallel launch, so launches hold the lock until
# then.
_launch_lock = threading.Lock()
_serialise_launches = None  # None until the first launch has picked the layer


# GNU OpenMP can't run in a process forked from one that has used it: Numba
# kills such a child ("fork() called from a process already using GNU OpenMP")
# at its first parallel launch, as multiprocessing's default start method on
# Linux meets whenever the parent used the op before starting its workers. A
# child forked like that runs serial twins of the kernels instead (compiled
# there on first use; one core per worker process).
_forked_from_gnu_openmp = False
_serial_twins = {}


def _after_fork_in_child():
    global _forked_from_gnu_openmp, _launch_lock
    _launch_lock = threading.Lock()  # one held by another parent thread would stay held here
    if "numba" not in sys.modules:
        return
    import numba
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel launch in the parent: the child starts its own layer
        return
    if layer == "omp":
        from numba.np.ufunc import omppool
        _forked_from_gnu_openmp = omppool.openmp_vendor == "GNU"


os.register_at_fork(after_in_child=_after_fork_in_child)


def _serial_twin(kernel):
    """The kernel compiled without parallel=True (prange runs as range): no threading layer."""
    twin = _serial_twins.get(kernel)
    if twin is None:
        from numba import njit
        options = {k: v for k, v in kernel.targetoptions.items() if k in ("nogil", "fastmath")}
        twin = _serial_twins[kernel] = njit(**options)(kernel.py_func)
    return twin


def _launch(kernel, *args):
    global _serialise_launches
    if _forked_from_gnu_openmp:
        _serial_twin(kernel)(*args)
        return
    if _serialise_launches is False:
        kernel(*args)
        return
    with _launch_lock:
        kernel(*args)
        if _serialise_launches is None:
            import numba
            _serialise_launches = numba.threading_layer() == "workqueue"


def _bits(array):
    """The array as the kernels read it: float32 as is, 16-bit floats as uint16 bits."""
    return array if array.dtype == np.float32 else array.view(np.uint16)


def embedding_mean(table, ids, axis, mask_zero, out=None):
    from numba import get_num_threads

    from ..kernels import cpu as kernels
    ids = np.ascontiguousarray(ids)  # the kernels walk ids flat; copies only ids, never the table
    batch, length = ids.shape
    if out is None:
        out = np.empty(output_shape(axis, batch, length, table.shape[1]), dtype=table.dtype)
    bad_position = np.empty(batch, dtype=np.int64)
    fmt = table_format(table.dtype)
    bags_per_chunk = launch.cpu_bags_per_chunk(batch, get_num_threads())
    rows_ahead = launch.cpu_rows_ahead(table.shape[1] * table.dtype.itemsize)
    if axis is Axis.SEQUENCE:
        _launch(kernels.gather_mean_sequence, _bits(table), ids, mask_zero, fmt, bags_per_chunk,
                rows_ahead, _bits(out), bad_position)
    else:
        means = row_mean_cache.row_means(table, _row_means)
        if means is not None:  # a constant table: B*L scalar reads
            _launch(kernels.gather_row_means, means, ids, mask_zero, fmt, bags_per_chunk,
                    _bits(out), bad_position)
        else:
            _launch(kernels.gather_mean_embedding, _bits(table), ids, mask_zero, fmt, bags_per_chunk,
                    rows_ahead, _bits(out), bad_position)
    raise_first_bad_id(bad_position, ids, table.shape[0])
    return out


def _row_means(table):
    """float32 mean of each row of a (V, D) table: [V]."""
    from ..kernels import cpu as kernels
    means = np.empty(table.shape[0], dtype=np.float32)
    _launch(kernels.row_means, _bits(table), table_format(table.dtype), means)
    return means
