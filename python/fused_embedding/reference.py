"""The exact reference: a float64 NumPy gather-then-mean.

Used by the tests, the validation command and the benchmarks' correctness
checks. It materialises the (B, L, D) intermediate on purpose: it is the
plain definition of the op, not a fast path.
"""
from __future__ import annotations

import numpy as np

from .semantics import EMPTY_BAG_VALUE, PADDING_ID, Axis
from .spec import Pooling


def dequantized_rows(table, ids) -> np.ndarray:
    """float64 values of ``table[ids]`` ([*ids.shape][D]): a float table's as they are, a
    ``QuantizedTable``'s dequantised by its documented layout (quantized.py), q * scale +
    bias ("int8", "int4": low nibble first) or q / scale ("keras_int8"), in float64.
    Reads the gathered rows only."""
    if not hasattr(table, "params"):
        return np.asarray(table)[ids].astype(np.float64)
    data, params = table.data[ids], table.params[ids].astype(np.float64)  # [..][C], [..][P]
    if table.mode == "int4":
        q = np.stack([data & 15, data >> 4], axis=-1).reshape(*data.shape[:-1], 2 * data.shape[-1])
    else:
        q = data
    if table.mode == "keras_int8":
        return q / params[..., :1]
    return q * params[..., :1] + params[..., 1:]


def embedding_mean_reference(table, ids, axis=Axis.SEQUENCE, mask_zero=False) -> np.ndarray:
    """float64 ``mean(table[ids], axis)`` with the package's semantics.

    table: (V, D) any float dtype (read as float64), or a ``QuantizedTable`` (its rows
    dequantised in float64: ``dequantized_rows``). ids: (B, L) integers in [0, V).
    Returns (B, D) for axis 1, (B, L) for axis 2, float64.
    Reads B*L ids and B*L*D table elements; writes B*L*D (the intermediate) then the result.
    """
    axis = Axis(2 if axis == -1 else axis)
    ids = np.asarray(ids)
    rows = dequantized_rows(table, ids)      # [B][L][D]
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
    means = rows.mean(axis=2) if rows.shape[-1] else np.zeros(ids.shape)  # [B][L]
    return np.where(counted, means, EMPTY_BAG_VALUE)


def embedding_bag_reference(table, values, offsets, weights=None, combiner="mean") -> np.ndarray:
    """float64 ``combiner(table[values] * weights)`` per CSR bag, with the package's semantics.

    table: (V, D) any float dtype (read as float64), or a ``QuantizedTable`` (dequantised
    in float64, ``dequantized_rows``). values: (N,) integers in [0, V).
    offsets: (B + 1,) non-decreasing, offsets[0] == 0, offsets[-1] == N (bag b is
    values[offsets[b]:offsets[b + 1]]). weights: None (all 1) or (N,) floats.
    combiner: "mean" (sum(w * row) / sum(w)), "sum", "sqrtn" (sum(w * row) / sqrt(sum(w^2)));
    a zero denominator gives zeros, as TF's div_no_nan (so does an empty bag).
    Returns (B, D) float64. Reads N ids and N*D table elements; writes N*D, then the result.
    """
    combiner = Pooling.of(combiner)
    values = np.asarray(values)
    offsets = np.asarray(offsets, dtype=np.int64)
    batch = offsets.shape[0] - 1
    w = np.ones(values.shape[0]) if weights is None else np.asarray(weights).astype(np.float64)
    bag_of = np.repeat(np.arange(batch), np.diff(offsets))    # [N]
    rows = dequantized_rows(table, values)                   # [N][D]
    sums = np.zeros((batch, rows.shape[1]))
    np.add.at(sums, bag_of, rows * w[:, None])                # [B][D]
    if combiner is Pooling.SUM:
        return sums
    terms = w if combiner is Pooling.MEAN else w * w
    divisor = np.zeros(batch)
    np.add.at(divisor, bag_of, terms)
    if combiner is Pooling.SQRTN:
        divisor = np.sqrt(divisor)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(divisor[:, None] != 0, sums / divisor[:, None], EMPTY_BAG_VALUE)
