"""The exact reference: a float64 NumPy gather-then-mean.

Used by the tests, the validation command and the benchmarks' correctness
checks. It materialises the (B, L, D) intermediate on purpose: it is the
plain definition of the op, not a fast path.
"""
from __future__ import annotations

import numpy as np

from .semantics import EMPTY_BAG_VALUE, PADDING_ID, Axis


def embedding_mean_reference(table, ids, axis=Axis.SEQUENCE, mask_zero=False) -> np.ndarray:
    """float64 ``mean(table[ids], axis)`` with the package's semantics.

    table: (V, D) any float dtype (read as float64). ids: (B, L) integers in [0, V).
    Returns (B, D) for axis 1, (B, L) for axis 2, float64.
    Reads B*L ids and B*L*D table elements; writes B*L*D (the intermediate) then the result.
    """
    axis = Axis(2 if axis == -1 else axis)
    table64 = np.asarray(table).astype(np.float64)
    ids = np.asarray(ids)
    rows = table64[ids]                      # [B][L][D]
    counted = np.ones(ids.shape, dtype=bool) if not mask_zero else ids != PADDING_ID  # [B][L]
    # Select rather than multiply by the mask: padding rows are never read by
    # the op, so a NaN stored in row 0 must not reach the result.
    rows = np.where(counted[..., None], rows, 0.0)
    if axis is Axis.SEQUENCE:
        counts = counted.sum(axis=1)          # [B]
        sums = rows.sum(axis=1)               # [B][D]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / counts[:, None]
        return np.where(counts[:, None] > 0, means, EMPTY_BAG_VALUE)
    means = rows.mean(axis=2) if table64.shape[1] else np.zeros(ids.shape)  # [B][L]
    return np.where(counted, means, EMPTY_BAG_VALUE)
