"""The cpu backend's CSR bags launcher as a C function, for the TF op's compiled kernel.

``tf_host_op.cc``'s ``FusedEmbeddingBag`` calls ``launch_bags`` through its address, with
no Python and no GIL on the way: the same kernels (kernels/cpu_bags.py), merge-path
chunking and serial/parallel choice (``launch.py``) as ``fused_embedding.embedding_bag``
on the cpu backend, on raw buffers. Compiled when first imported and cached on disk, as
``cpu_cfunc.py``'s launcher is (the same caveats on editing the kernels apply).

Arguments (declared once in ``c_interface.BAG_LAUNCHER``):
  table: address of [V][D] float32, or uint16 bits of float16 / bfloat16 (``format``)
  vocab, dim: V, D; format: ``semantics.FORMAT_*``
  values: address of [total] int32 or int64 ids (``id_bytes`` 4 or 8)
  offsets: address of [batch + 1] int64, validated by the caller
  weights: address of [total] float32 when ``weighted`` is 1 (else any valid address)
  pooling: ``spec.Pooling.kernel_code``; team_size: Numba's thread count
  serial_only: 1 to run on the calling thread whatever the size
  out: address of the [batch][D] result, the table's element type
Returns the first position in values of an id outside [0, V), or total.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit

from .. import c_interface, launch
from ..kernels.cpu_bags import embedding_bag, embedding_bag_serial
from ..semantics import FORMAT_FLOAT32
from .cpu_cfunc import cached_cfunc

_rows_ahead = njit(launch.cpu_rows_ahead)
_runs_serial = njit(launch.cpu_runs_serial)
_bag_chunks = njit(launch.cpu_bag_chunks)


@njit(inline="always")
def _run(table, values, offsets, weights, weighted, pooling, fmt, team_size, serial_only, out):
    total, batch = values.shape[0], offsets.shape[0] - 1
    row_bytes = table.shape[1] * table.itemsize
    serial = serial_only or _runs_serial(total, row_bytes)
    n_chunks = _bag_chunks(total, batch, team_size, serial)
    rows_ahead = _rows_ahead(row_bytes)
    if serial:
        return embedding_bag_serial(table, values, offsets, weights, weighted, pooling, fmt, n_chunks,
                                    rows_ahead, out)
    return embedding_bag(table, values, offsets, weights, weighted, pooling, fmt, n_chunks, rows_ahead, out)


@njit(inline="always")
def _with_values(table, out, fmt, values_address, id_bytes, total, offsets, weights, weighted, pooling,
                 team_size, serial_only):
    if id_bytes == 4:
        values = carray(values_address, (total,), np.int32)
        return _run(table, values, offsets, weights, weighted, pooling, fmt, team_size, serial_only, out)
    values = carray(values_address, (total,), np.int64)
    return _run(table, values, offsets, weights, weighted, pooling, fmt, team_size, serial_only, out)


def launch_bags(table_address, vocab, dim, fmt, values_address, id_bytes, total, offsets_address, batch,
                weights_address, weighted, pooling, team_size, serial_only, out_address):
    offsets = carray(offsets_address, (batch + 1,), np.int64)
    is_weighted = weighted != 0
    weights = carray(weights_address, (total if is_weighted else 0,), np.float32)
    serial = serial_only != 0
    if fmt == FORMAT_FLOAT32:
        table = carray(table_address, (vocab, dim), np.float32)
        out = carray(out_address, (batch, dim), np.float32)
        return _with_values(table, out, fmt, values_address, id_bytes, total, offsets, weights, is_weighted,
                            pooling, team_size, serial)
    table = carray(table_address, (vocab, dim), np.uint16)
    out = carray(out_address, (batch, dim), np.uint16)
    return _with_values(table, out, fmt, values_address, id_bytes, total, offsets, weights, is_weighted,
                        pooling, team_size, serial)


launch_bags = cached_cfunc(launch_bags, c_interface.BAG_LAUNCHER.numba_signature())
