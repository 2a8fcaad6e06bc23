"""Host buffers with a chosen start address: cache-line aligned tables, huge-page vectors.

NumPy starts its buffers 16 bytes into a cache line. A table whose rows do not
start on 64-byte lines reads one line more per row than its size (a 64-byte
float32 row at D=16 touches two lines), which the gather kernels then have to
fetch too; TensorFlow's allocator aligns to 64, so tables arriving through the
TF op are already aligned. ``empty_aligned`` gives NumPy arrays the same start.
"""
from __future__ import annotations

import math

import numpy as np

from .launch import CACHE_LINE_BYTES

HUGE_PAGE_BYTES = 2 << 20
# The TF op's host results of this many bytes and more start on a 64-byte line, so it
# can hand them to TensorFlow through DLPack instead of having TF copy them (TF takes
# a foreign buffer only when it is aligned). Smaller ones skip what the alignment
# costs; TF's copy of them is about as cheap.
ALIGNED_OUTPUT_MIN_BYTES = 64 << 10
# NumPy asks Linux for transparent huge pages (madvise) on allocations of this many
# bytes and more; smaller ones stay on 4 KB pages.
NUMPY_HUGE_PAGE_MIN_BYTES = 4 << 20


def empty_aligned(shape, dtype, alignment: int = CACHE_LINE_BYTES, min_bytes: int = 0) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of ``alignment`` bytes.

    A view into a slightly larger uint8 buffer (kept alive through ``.base``) of
    at least ``min_bytes`` bytes.
    """
    shape = tuple(shape) if np.ndim(shape) else (int(shape),)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(max(nbytes, min_bytes) + alignment, dtype=np.uint8)
    start = -buffer.__array_interface__["data"][0] % alignment  # cheaper than .ctypes.data
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def empty_on_huge_pages(count: int, dtype) -> np.ndarray:
    """np.empty(count, dtype) on transparent huge pages, where it is large enough to matter.

    For vectors read at scattered places (the cached row means): on 4 KB pages
    nearly every read also walks the page table once other work has churned the
    TLB; on 2 MB pages a 4 MB vector needs two TLB entries. Only a hint: where
    the kernel has huge pages off, this is an ordinary array.
    """
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes < HUGE_PAGE_BYTES // 2:
        return np.empty(count, dtype=dtype)
    return empty_aligned(count, dtype, alignment=HUGE_PAGE_BYTES, min_bytes=NUMPY_HUGE_PAGE_MIN_BYTES)
