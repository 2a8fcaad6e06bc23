"""The "cpu" backend: Numba kernels, parallel over bags, on host arrays."""
from __future__ import annotations

import os
import threading

import numpy as np
import numba  # no numba: the registry reports this backend unavailable
from numba.core.caching import FunctionCache
from numba.core.runtime import rtsys

from .. import launch, row_mean_cache
from ..memory import empty_on_huge_pages, host_memory_limit_bytes
from ..semantics import Axis, table_format, output_shape
from . import raise_bad_id_at

DEVICE = "cpu"


def unavailable_reason() -> str | None:
    return None  # importing this module needed numba already


def memory_limit_bytes() -> int:
    """Bytes an output may still take on the host, cgroup limits included (memory.py);
    the TF op's compiled kernel asks this too."""
    return host_memory_limit_bytes()


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
# child forked like that runs the serial entry points instead (one core per
# worker process).
_forked_from_gnu_openmp = False
_serial_only_callbacks = []  # told when this process can only run serial entry points


def _after_fork_in_child():
    global _forked_from_gnu_openmp, _launch_lock
    _launch_lock = threading.Lock()  # one held by another parent thread would stay held here
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel launch in the parent: the child starts its own layer
        return
    if layer == "omp":
        from numba.np.ufunc import omppool
        _forked_from_gnu_openmp = omppool.openmp_vendor == "GNU"
        if _forked_from_gnu_openmp:
            for callback in _serial_only_callbacks:
                callback()


def runs_serial_only() -> bool:
    """True in a process that can't start Numba's thread team (see above)."""
    return _forked_from_gnu_openmp


def on_serial_only(callback) -> None:
    """Call ``callback()`` in a child forked from this process if that child can run
    only the serial entry points (launchers outside Python, which ``_launch`` doesn't see)."""
    _serial_only_callbacks.append(callback)


def parallel_launches_thread_safe() -> bool:
    """True when parallel kernels may be launched from several threads at once without
    the lock here: Numba's layer is TBB or OpenMP (it is picked at the first launch, so
    this starts it if no launch has), or this process runs serial only."""
    global _serialise_launches
    if _serialise_launches is None and not _forked_from_gnu_openmp:
        # Start the team as a first parallel launch would, without loading a kernel for it.
        from numba.np.ufunc.parallel import _launch_threads
        with _launch_lock:
            _launch_threads()
            _serialise_launches = numba.threading_layer() == "workqueue"
    return _forked_from_gnu_openmp or _serialise_launches is False


os.register_at_fork(after_in_child=_after_fork_in_child)


def _launch(kernel, *args, serial=False):
    """Run a parallel kernel, or its serial entry point when asked to (small calls) or forced to.

    Returns what the kernel returns.
    """
    global _serialise_launches
    if serial or _forked_from_gnu_openmp:
        return _kernel_module().SERIAL[kernel](*args)
    if _serialise_launches is False:
        return kernel(*args)
    with _launch_lock:
        result = kernel(*args)
        if _serialise_launches is None:
            _serialise_launches = numba.threading_layer() == "workqueue"
    return result


class _CacheLoadingWithoutRefresh(FunctionCache):
    """Numba's disk cache of one function, loading machine code without refreshing the target.

    Numba's own ``load_overload`` first refreshes the whole CPU target: it imports and
    registers every typing and lowering registry (NumPy's linalg, random, typed
    containers, ...), which compiling needs and loading compiled code does not. On the
    first load in a process that is 250-770 ms here, more than the rest of the first
    call (benchmarks/NOTES.md). Loading needs Numba's runtime (NRT), initialised here.
    A signature the cache lacks compiles as before: Numba's compiler refreshes the
    target itself. Saving is Numba's own. Should a load fail without the refresh (machine
    code needing something only the refresh registers), it is retried Numba's own way.
    """

    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)
        try:
            with self._guard_against_spurious_io_errors():
                return self._load_overload(sig, target_context)
        except Exception:
            return super().load_overload(sig, target_context)


def load_cached_without_refresh(function) -> None:
    """Make a ``cache=True`` njit dispatcher or cfunc load from its disk cache through
    ``_CacheLoadingWithoutRefresh``; nothing for one Numba doesn't cache that way."""
    cache = getattr(function, "_cache", None)
    if type(cache) is FunctionCache:
        cache.__class__ = _CacheLoadingWithoutRefresh


def _prepare_loading() -> None:
    """What loading any of the kernels from Numba's disk cache needs first, done once when
    this module is imported (for the TF op: when ``fused_embedding.tf`` is, before a model
    is built), not on the first call: Numba's runtime (NRT; its first use compiles its
    own functions, 20-25 ms here) and the modules of the Numba functions the kernels'
    machine code was built from, whose environments a load rebuilds (20-25 ms). Not the
    kernels themselves: their cache folder is found when kernels/cpu.py is imported, and
    a process may still choose it (``build.use_cache_dir``)."""
    from numba.core.registry import cpu_target
    rtsys.initialize(cpu_target.target_context)
    import numba.cpython.charseq  # noqa: F401
    import numba.cpython.unicode  # noqa: F401
    import numba.np.arrayobj  # noqa: F401


_prepare_loading()

_kernels = None  # kernels/cpu.py, imported at the first call, then kept here


def _kernel_module():
    global _kernels
    if _kernels is None:
        from ..build import announce_compiles
        announce_compiles()  # one warning if Numba's disk cache lacks a kernel (fused-embedding build)
        from ..kernels import cpu
        for parallel, serial in cpu.SERIAL.items():
            load_cached_without_refresh(parallel)
            load_cached_without_refresh(serial)
        _kernels = cpu
    return _kernels


def _bits(array):
    """The array as the kernels read it: float32 as is, 16-bit floats as uint16 bits."""
    return array if array.dtype == np.float32 else array.view(np.uint16)


def embedding_mean(table, ids, axis, mask_zero, out=None):
    kernels = _kernel_module()
    ids = np.ascontiguousarray(ids)  # the kernels walk ids flat; copies only ids, never the table
    batch, length = ids.shape
    if out is None:
        out = np.empty(output_shape(axis, batch, length, table.shape[1]), dtype=table.dtype)
    fmt = table_format(table.dtype)
    # The team's full size, not numba.get_num_threads() (which a caller may lower per
    # thread): the chunks only need to outnumber the threads, and that call costs
    # 5-20 us, as much as a small call's kernel.
    bags_per_chunk = launch.cpu_bags_per_chunk(batch, numba.config.NUMBA_NUM_THREADS)
    means = row_mean_cache.row_means(table, _row_means) if axis is Axis.EMBEDDING else None
    if means is not None:  # axis 2 on a constant table: B*L scalar reads
        first_bad = _launch(kernels.gather_row_means, means, ids, mask_zero, fmt,
                            bags_per_chunk, launch.CPU_MEANS_AHEAD, _bits(out),
                            serial=launch.cpu_runs_serial(batch * length, means.itemsize))
    else:
        kernel = (kernels.gather_mean_sequence if axis is Axis.SEQUENCE
                  else kernels.gather_mean_embedding)
        row_bytes = table.shape[1] * table.dtype.itemsize
        first_bad = _launch(kernel, _bits(table), ids, mask_zero, fmt, bags_per_chunk,
                            launch.cpu_rows_ahead(row_bytes, table.nbytes), _bits(out),
                            serial=launch.cpu_runs_serial(batch * length, row_bytes))
    if first_bad < batch * length:
        raise_bad_id_at(first_bad, ids, table.shape[0])
    return out


def _row_means(table):
    """float32 mean of each row of a (V, D) table: [V]."""
    kernels = _kernel_module()
    # Read at B*L scattered places a call: on huge pages, 1.6x faster (benchmarks/NOTES.md).
    means = empty_on_huge_pages(table.shape[0], np.float32)
    _launch(kernels.row_means, _bits(table), table_format(table.dtype), means)
    return means
