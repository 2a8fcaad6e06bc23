"""The names of the op's modes and policies, shared by every layer.

The public API takes plain ints and bools (``axis=1``, ``mask_zero=True``);
the core turns them into these names once, so backends and kernels never
interpret raw arguments themselves.
"""
from __future__ import annotations

import enum

import ml_dtypes
import numpy as np


class Axis(enum.IntEnum):
    """Which axis of the gathered (B, L, D) rows is averaged away."""

    SEQUENCE = 1   # -> (B, D): Keras GlobalAveragePooling1D() after Embedding
    EMBEDDING = 2  # -> (B, L): GlobalAveragePooling1D(data_format="channels_first")


# The empty-bag rule: a bag with no counted ids (L == 0, or all ids padding)
# averages to zeros, as torch EmbeddingBag, FBGEMM and TF's segment ops do.
# Keras returns NaN (0 / 0) there.
EMPTY_BAG_VALUE = 0.0

# With mask_zero, id 0 is padding (Keras' Embedding(mask_zero=True)).
PADDING_ID = 0

# Table dtypes the kernels read, and the code the kernels use for each.
# Half-width tables reach the Numba kernels as uint16 bit patterns (Numba's CPU
# target has no float16 or bfloat16), so the kernels need to know which
# 16-bit format the bits are in.
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FORMAT_FLOAT32, FORMAT_FLOAT16, FORMAT_BFLOAT16 = 0, 1, 2
TABLE_FORMATS = {
    np.dtype(np.float32): FORMAT_FLOAT32,
    np.dtype(np.float16): FORMAT_FLOAT16,
    BFLOAT16: FORMAT_BFLOAT16,
}

ID_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def table_format(dtype) -> int:
    """The kernel's code for a table dtype (float32, float16, bfloat16)."""
    code = TABLE_FORMATS.get(dtype)  # a NumPy dtype, the common case: no conversion
    return code if code is not None else TABLE_FORMATS[np.dtype(dtype)]


def output_shape(axis: Axis, batch: int, length: int, dim: int) -> tuple[int, int]:
    """(B, D) for Axis.SEQUENCE, (B, L) for Axis.EMBEDDING."""
    return (batch, dim) if axis is Axis.SEQUENCE else (batch, length)
