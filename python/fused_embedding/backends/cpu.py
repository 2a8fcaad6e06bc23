"""The "cpu" backend: Numba kernels, parallel over bags, on host arrays."""
from __future__ import annotations

import numpy as np

from .. import launch
from ..semantics import Axis, table_format, output_shape
from . import raise_first_bad_id
from .numpy import os_physical_memory

DEVICE = "cpu"


def unavailable_reason() -> str | None:
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        return f"numba is not installed ({exc})"
    return None


def memory_limit_bytes() -> int:
    return os_physical_memory()


def _bits(array):
    """The array as the kernels read it: float32 as is, 16-bit floats as uint16 bits."""
    return array if array.dtype == np.float32 else array.view(np.uint16)


def embedding_mean(table, ids, axis, mask_zero, out=None):
    from numba import get_num_threads

    from ..kernels import cpu as kernels
    batch, length = ids.shape
    if out is None:
        out = np.empty(output_shape(axis, batch, length, table.shape[1]), dtype=table.dtype)
    bad_position = np.empty(batch, dtype=np.int64)
    kernel = kernels.gather_mean_sequence if axis is Axis.SEQUENCE else kernels.gather_mean_embedding
    kernel(_bits(table), ids, mask_zero, table_format(table.dtype),
           launch.cpu_bags_per_chunk(batch, get_num_threads()), _bits(out), bad_position)
    raise_first_bad_id(bad_position, ids, table.shape[0])
    return out
