"""The "numpy" backend: the reference definition in the table's precision rules.

Slow (it materialises the (B, L, D) intermediate in float64), exact, and always
available: the baseline every other backend is validated against.
"""
from __future__ import annotations

import numpy as np

from ..reference import embedding_mean_reference
from . import out_of_range_error

DEVICE = "cpu"


def unavailable_reason() -> str | None:
    return None


def memory_limit_bytes() -> int:
    return host_memory_available()


def host_memory_available() -> int:
    """Bytes the host can still hand out: MemAvailable, not the total, so an
    output that fits the machine but not what is free now fails before it is
    allocated instead of being killed while the kernel writes it."""
    import os
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


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
