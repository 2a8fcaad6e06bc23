"""The memory-traffic model of the op: the bytes a fused kernel must move.

One place for it: the benchmarks, the CLI and the GPU check all report GB/s
and % of copy bandwidth from these formulas.
"""
from __future__ import annotations

import numpy as np

from .semantics import Axis


def fused_bytes(batch: int, length: int, dim: int, table_dtype, id_dtype,
                axis=Axis.SEQUENCE) -> int:
    """Bytes read and written by one fused call.

    Axis 1: ids (B*L) + gathered rows (B*L*D) + output (B*D).
    Axis 2: the same reads, output (B*L). (The cached row-mean path for
    axis 2 moves far less; it is reported against this same model so the
    two are comparable.)
    """
    item = np.dtype(table_dtype).itemsize
    id_bytes = np.dtype(id_dtype).itemsize
    out_elems = batch * dim if Axis(2 if axis == -1 else axis) is Axis.SEQUENCE else batch * length
    return batch * length * id_bytes + batch * length * dim * item + out_elems * item


def bag_bytes(values: int, batch: int, dim: int, table_dtype, id_dtype, weighted: bool,
              offset_bytes: int = 8) -> int:
    """Bytes read and written by one fused CSR bags call (embedding_bag).

    values (N ids) + offsets (B + 1) + weights (N float32, when weighted) + gathered
    rows (N*D) + output (B*D).
    """
    item = np.dtype(table_dtype).itemsize
    return (values * np.dtype(id_dtype).itemsize + (batch + 1) * offset_bytes
            + (values * 4 if weighted else 0) + values * dim * item + batch * dim * item)


def copy_bytes(nbytes: int) -> int:
    """A copy of nbytes moves nbytes read plus nbytes written."""
    return 2 * nbytes


def gb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")
