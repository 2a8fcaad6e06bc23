"""Numba CPU kernels: gather rows of a (V, D) table by (B, L) ids and average.

Each kernel makes one pass over the ids: it checks bounds, skips padding,
accumulates rows in float32 and writes the result, never the (B, L, D)
intermediate. Bags are split into chunks, one parallel iteration per chunk, so
the float32 accumulator is allocated once per chunk, not per bag. A bag with an
out-of-range id stops at it and records its position in ``bad_position``; the
host raises after the launch (no second pass over the ids).

Arrays: table [V][D] float32 or uint16 bits of float16/bfloat16 (``fmt``);
ids [B][L] int32/int64; out float32 or uint16 bits in the table's format.
Compiled once per signature and cached on disk (``cache=True``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cpu_scalars import prefetch, store, widen

# Rows fetched ahead of the one being summed: enough to cover DRAM latency with
# a few rows of work, few enough that the lines are still in L1/L2 when used.
PREFETCH_ROWS = 8
CACHE_LINE_BYTES = 64


@njit(inline="always")
def _prefetch_row(table, ids, b, l, bag_end, length, line_step):
    """Prefetch the row that position (b, l) + PREFETCH_ROWS will read."""
    ahead = l + PREFETCH_ROWS
    nb = b + ahead // length
    if nb < bag_end:
        r = ids[nb, ahead % length]
        if 0 <= r < table.shape[0]:
            for d in range(0, table.shape[1], line_step):
                prefetch(table, r, d)


@njit(parallel=True, cache=True, nogil=True)
def gather_mean_sequence(table, ids, mask_zero, fmt, bags_per_chunk, out, bad_position):
    """out[b, :] = mean of table[ids[b, l], :] over the counted positions l.  [B][D]"""
    batch, length = ids.shape
    vocab, dim = table.shape
    line_step = max(1, CACHE_LINE_BYTES // table.itemsize)
    n_chunks = (batch + bags_per_chunk - 1) // bags_per_chunk
    for chunk in prange(n_chunks):
        acc = np.empty(dim, dtype=np.float32)  # [D], one per chunk
        first = chunk * bags_per_chunk
        last = min(batch, first + bags_per_chunk)
        for b in range(first, last):
            acc[:] = 0.0
            count = 0
            bad_position[b] = -1
            for l in range(length):
                _prefetch_row(table, ids, b, l, last, length, line_step)
                r = ids[b, l]
                if r < 0 or r >= vocab:
                    bad_position[b] = l
                    break
                if mask_zero and r == 0:
                    continue
                count += 1
                for d in range(dim):
                    acc[d] += widen(table[r, d], fmt)
            for d in range(dim):
                store(out, b, d, acc[d] / np.float32(count) if count else np.float32(0.0), fmt)


@njit(inline="always", fastmath={"reassoc"})
def _row_mean(table, r, fmt):
    # reassoc lets LLVM vectorise the sum; NaN and inf still propagate.
    total = np.float32(0.0)
    for d in range(table.shape[1]):
        total += widen(table[r, d], fmt)
    return total / np.float32(table.shape[1])


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def gather_mean_embedding(table, ids, mask_zero, fmt, bags_per_chunk, out, bad_position):
    """out[b, l] = mean over d of table[ids[b, l], d]; padding gives 0.  [B][L]"""
    batch, length = ids.shape
    vocab = table.shape[0]
    line_step = max(1, CACHE_LINE_BYTES // table.itemsize)
    n_chunks = (batch + bags_per_chunk - 1) // bags_per_chunk
    for chunk in prange(n_chunks):
        first = chunk * bags_per_chunk
        last = min(batch, first + bags_per_chunk)
        for b in range(first, last):
            bad_position[b] = -1
            for l in range(length):
                _prefetch_row(table, ids, b, l, last, length, line_step)
                r = ids[b, l]
                if r < 0 or r >= vocab:
                    bad_position[b] = l
                    break
                if mask_zero and r == 0:
                    store(out, b, l, np.float32(0.0), fmt)
                else:
                    store(out, b, l, _row_mean(table, r, fmt), fmt)


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def row_means(table, fmt, out):
    """out[r] = mean over d of table[r, d], in float32.  [V]

    Feeds the cached axis-2 path: with it, axis 2 is a scalar gather.
    """
    for r in prange(table.shape[0]):
        out[r] = _row_mean(table, r, fmt)


@njit(parallel=True, cache=True, nogil=True)
def gather_row_means(means, ids, mask_zero, fmt, bags_per_chunk, out, bad_position):
    """out[b, l] = means[ids[b, l]]; padding gives 0.  [B][L], reads B*L ids and means."""
    batch, length = ids.shape
    vocab = means.shape[0]
    n_chunks = (batch + bags_per_chunk - 1) // bags_per_chunk
    for chunk in prange(n_chunks):
        first = chunk * bags_per_chunk
        last = min(batch, first + bags_per_chunk)
        for b in range(first, last):
            bad_position[b] = -1
            for l in range(length):
                r = ids[b, l]
                if r < 0 or r >= vocab:
                    bad_position[b] = l
                    break
                value = np.float32(0.0) if mask_zero and r == 0 else means[r]
                store(out, b, l, value, fmt)
