"""The "numpy" backend: the reference definition in the table's precision rules.

Slow (it materialises the (B, L, D) intermediate in float64), exact, and always
available: the baseline every other backend is validated against.
"""
from __future__ import annotations

import numpy as np

from ..memory import host_memory_limit_bytes
from ..reference import embedding_mean_reference
from . import out_of_range_error

DEVICE = "cpu"


def unavailable_reason() -> str | None:
    return None


def memory_limit_bytes() -> int:
    return host_memory_limit_bytes()


def embedding_mean(table, ids, axis, mask_zero, out=None):
    vocab = table.shape[0]
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise out_of_range_error(int(ids[row, col]), row, col, vocab)
    result = embedding_mean_reference(table, ids, axis, mask_zero)
    if out is None:
        return result.astype(table.dtype)
    out[...] = result.astype(table.dtype)
    return out
