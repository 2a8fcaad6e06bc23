"""The cpu backend's axis-1 launcher as a C function, for callers outside Python.

The TF op's compiled kernel (``tf_host_op.cc``) calls ``launch_sequence_mean`` through
its address, with no Python and no GIL on the way: the same Numba kernels, chunking,
prefetch distance and serial/parallel choice as ``backends/cpu.py``'s
``embedding_mean``, on raw buffers. Compiled when this module is first imported and
cached on disk (loaded from there without refreshing Numba's target: ``cached_cfunc``).

Two things are fixed when it compiles: the launch heuristics (``launch.py``), whose
module constants Numba reads as constants (setting ``launch.CPU_SERIAL_MAX_BYTES``
later changes the Python launcher, not this one), and the kernels it inlines. Numba
keys the disk cache on this file alone: after editing ``launch.py`` or the kernels
(``kernels/cpu*.py``), delete ``backends/__pycache__/cpu_cfunc.*.nb[ic]`` as well as
``kernels/__pycache__/*.nb[ic]``, or the old machine code keeps running.

Arguments (all int64 but the addresses; declared once in ``c_interface.LAUNCHER``):
  table: address of [V][D] float32, or uint16 bits of float16 / bfloat16 (``format``)
  vocab, dim: V, D; format: ``semantics.FORMAT_*``
  ids: address of [B][L] int32 or int64 (``id_bytes`` 4 or 8); batch, length: B, L
  mask_zero: 1 when id 0 is padding
  team_size: Numba's thread count (``NUMBA_NUM_THREADS``), for the chunking
  serial_only: 1 to run on the calling thread whatever the size
  out: address of the [B][D] result, the table's element type
Returns the first flat position b * L + l of an id outside [0, V), or B * L.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit
from numba.core import sigutils
from numba.core.ccallback import CFunc
from numba.np.ufunc.parallel import _launch_threads

from .. import c_interface, launch
from ..kernels.cpu import SERIAL, gather_mean_sequence
from ..semantics import FORMAT_FLOAT32
from .cpu import load_cached_without_refresh

# Machine code loaded from the disk cache links against the thread team's entry
# points, which Numba registers only once its threading layer has started; a fresh
# process fails with "Symbol not found: allocate_sched" otherwise.
_launch_threads()

SIGNATURE = c_interface.LAUNCHER.numba_signature()  # what tf_host_op.cc calls

# The launch heuristics compiled as they are: one definition for both launchers.
_rows_ahead = njit(launch.cpu_rows_ahead)
_runs_serial = njit(launch.cpu_runs_serial)
_bags_per_chunk = njit(launch.cpu_bags_per_chunk)
_gather_mean_sequence_serial = SERIAL[gather_mean_sequence]


@njit(inline="always")
def _run(table, ids, out, fmt, mask_zero, team_size, serial_only):
    batch, length = ids.shape
    row_bytes = table.shape[1] * table.itemsize
    bags_per_chunk = _bags_per_chunk(batch, team_size)
    rows_ahead = _rows_ahead(row_bytes, table.shape[0] * row_bytes)
    if serial_only or _runs_serial(batch * length, row_bytes):
        return _gather_mean_sequence_serial(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out)
    return gather_mean_sequence(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out)


@njit(inline="always")
def _with_ids(table, out, fmt, ids_address, id_bytes, batch, length, mask_zero, team_size, serial_only):
    if id_bytes == 4:
        ids = carray(ids_address, (batch, length), np.int32)
        return _run(table, ids, out, fmt, mask_zero, team_size, serial_only)
    ids = carray(ids_address, (batch, length), np.int64)
    return _run(table, ids, out, fmt, mask_zero, team_size, serial_only)


def cached_cfunc(function, signature=SIGNATURE):
    """``numba.cfunc(signature, cache=True)(function)``, loaded from the disk cache without
    refreshing Numba's target (``backends/cpu.py``: most of a first load's time)."""
    compiled = CFunc(function, sigutils.normalize_signature(signature), locals={}, options={})
    compiled.enable_caching()
    load_cached_without_refresh(compiled)
    compiled.compile()
    return compiled


def launch_sequence_mean(table_address, vocab, dim, fmt, ids_address, id_bytes, batch, length,
                         mask_zero, team_size, serial_only, out_address):
    mask = mask_zero != 0
    serial = serial_only != 0
    if fmt == FORMAT_FLOAT32:
        table = carray(table_address, (vocab, dim), np.float32)
        out = carray(out_address, (batch, dim), np.float32)
        return _with_ids(table, out, fmt, ids_address, id_bytes, batch, length, mask, team_size, serial)
    table = carray(table_address, (vocab, dim), np.uint16)
    out = carray(out_address, (batch, dim), np.uint16)
    return _with_ids(table, out, fmt, ids_address, id_bytes, batch, length, mask, team_size, serial)


launch_sequence_mean = cached_cfunc(launch_sequence_mean)
