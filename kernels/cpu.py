"""Numba CPU kernels: gather rows of a (V, D) table by (B, L) ids and average.

Each kernel makes one pass over the ids: it checks bounds, skips padding,
accumulates rows in float32 and writes the result, never the (B, L, D)
intermediate. Bags are split into chunks (``launch.cpu_bags_per_chunk``), one
parallel iteration per chunk, so the float32 accumulator is allocated once per
chunk, not per bag. A bag with an out-of-range id stops at it; the gather
kernels return the smallest flat position ``b * L + l`` of a bad id, or B*L
when every id is in range (the GPU kernels' convention), and the host raises
after the launch (no second pass over the ids).

Arrays: table [V][D] float32 or uint16 bits of float16/bfloat16 (``fmt``);
ids [B][L] int32/int64; out float32 or uint16 bits in the table's format.
Compiled once per signature and cached on disk (``cache=True``). Numba keys that
cache on this file alone: after editing cpu_rows.py or cpu_scalars.py, delete
kernels/__pycache__/*.nb[ic] (and the TF op's launcher,
python/fused_embedding/backends/__pycache__/cpu_cfunc.*.nb[ic]) or the old machine
code keeps running.

Every kernel has two entry points over one body: ``name`` (parallel, on Numba's
threading layer) and ``name_serial`` (the same loop on the calling thread).
Small calls run serial: waking the thread team costs more than they take
(``launch.cpu_runs_serial``). Two functions, not one compiled twice, because
Numba's disk cache keys on the function, not on its parallel flag.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cpu_rows import sum_vector_columns
from .cpu_scalars import elements_per_cache_line, prefetch, store, widen



@njit(inline="always")
def _prefetch_rows(table, flat_ids, start, stop):
    """Prefetch every line of the rows named by flat_ids[start:stop] (stop <= len(flat_ids)).

    A line every 64 bytes from the row's start, and the line of its last element
    (a table not aligned to 64 bytes has rows across one more line). The ids are
    not checked: a prefetch never faults, so a bad id costs nothing here and is
    reported by the pass that reads it.
    """
    last = table.shape[1] - 1
    for p in range(start, stop):
        r = flat_ids[p]
        for d in range(0, table.shape[1], elements_per_cache_line(table)):
            prefetch(table, r, d)
        prefetch(table, r, last)


@njit(inline="always")
def _collect_rows(ids, b, vocab, mask_zero, rows):
    """rows[:count] = the bag's counted ids, up to its first bad id.

    Returns (count, the column of the first bad id or -1).
    """
    count = 0
    for l in range(ids.shape[1]):
        r = ids[b, l]
        if r < 0 or r >= vocab:
            return count, l
        if not (mask_zero and r == 0):
            rows[count] = r
            count += 1
    return count, -1


@njit(inline="always")
def _store_means(out, b, acc, count, fmt):
    """out[b, :] = acc / count, or the empty-bag zeros (branch outside the loop so it vectorises)."""
    if count:
        divisor = np.float32(count)
        for d in range(out.shape[1]):
            store(out, b, d, acc[d] / divisor, fmt)
    else:
        for d in range(out.shape[1]):
            store(out, b, d, np.float32(0.0), fmt)


@njit(inline="always")
def _gather_mean_sequence(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out):
    """out[b, :] = mean of table[ids[b, l], :] over the counted positions l.  [B][D]

    Columns go in vector passes with the accumulators in vector registers
    (kernels/cpu_rows.py: 128 columns a pass, the last pass's last vector masked
    where D is not a multiple of 16), each pass prefetching its columns of the rows
    rows_ahead ahead (launch.cpu_rows_ahead). A table that is not C-contiguous takes
    a scalar pass instead. ids must be C-contiguous.
    """
    batch, length = ids.shape
    vocab, dim = table.shape
    flat_ids = ids.reshape(-1)
    n_chunks = (batch + bags_per_chunk - 1) // bags_per_chunk
    first_bad = batch * length
    for chunk in prange(n_chunks):
        acc = np.empty(dim, dtype=np.float32)   # [D], one per chunk
        rows = np.empty(length, dtype=np.int64)  # [L], the bag's counted ids
        first = chunk * bags_per_chunk
        last = min(batch, first + bags_per_chunk)
        end = last * length
        _prefetch_rows(table, flat_ids, first * length, min(end, first * length + rows_ahead))
        for b in range(first, last):
            count, bad_col = _collect_rows(ids, b, vocab, mask_zero, rows)
            if bad_col >= 0:
                first_bad = min(first_bad, b * length + bad_col)
            ahead = b * length + rows_ahead
            col = sum_vector_columns(table, rows, count, fmt, flat_ids, ahead, end, acc)
            if col < dim:
                acc[col:] = 0.0
                for k in range(count):
                    if col == 0:
                        _prefetch_rows(table, flat_ids, min(end, ahead + k), min(end, ahead + k + 1))
                    r = rows[k]
                    for d in range(col, dim):
                        acc[d] += widen(table[r, d], fmt)
            _store_means(out, b, acc, count, fmt)
    return first_bad


@njit(parallel=True, cache=True, nogil=True)
def gather_mean_sequence(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out):
    """_gather_mean_sequence on Numba's thread team."""
    return _gather_mean_sequence(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out)


@njit(cache=True, nogil=True)
def gather_mean_sequence_serial(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out):
    """_gather_mean_sequence on the calling thread."""
    return _gather_mean_sequence(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out)


@njit(inline="always", fastmath={"reassoc"})
def _row_mean(table, r, fmt):
    # reassoc lets LLVM vectorise the sum; NaN and inf still propagate.
    total = np.float32(0.0)
    for d in range(table.shape[1]):
        total += widen(table[r, d], fmt)
    return total / np.float32(table.shape[1])


@njit(inline="always")
def _gather_mean_embedding(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out):
    """out[b, l] = mean over d of table[ids[b, l], d]; padding gives 0.  [B][L]"""
    batch, length = ids.shape
    vocab = table.shape[0]
    flat_ids = ids.reshape(-1)
    n_chunks = (batch + bags_per_chunk - 1) // bags_per_chunk
    first_bad = batch * length
    for chunk in prange(n_chunks):
        first = chunk * bags_per_chunk
        last = min(batch, first + bags_per_chunk)
        end = last * length
        for b in range(first, last):
            for l in range(length):
                p = b * length + l + rows_ahead
                _prefetch_rows(table, flat_ids, p, min(end, p + 1))
                r = ids[b, l]
                if r < 0 or r >= vocab:
                    first_bad = min(first_bad, b * length + l)
                    break
                if mask_zero and r == 0:
                    store(out, b, l, np.float32(0.0), fmt)
                else:
                    store(out, b, l, _row_mean(table, r, fmt), fmt)
    return first_bad


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def gather_mean_embedding(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out):
    """_gather_mean_embedding on Numba's thread team."""
    return _gather_mean_embedding(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out)


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def gather_mean_embedding_serial(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out):
    """_gather_mean_embedding on the calling thread."""
    return _gather_mean_embedding(table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out)


@njit(inline="always")
def _row_means(table, fmt, out):
    """out[r] = mean over d of table[r, d], in float32.  [V]

    Feeds the cached axis-2 path: with it, axis 2 is a scalar gather.
    """
    for r in prange(table.shape[0]):
        out[r] = _row_mean(table, r, fmt)


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def row_means(table, fmt, out):
    """_row_means on Numba's thread team."""
    _row_means(table, fmt, out)


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def row_means_serial(table, fmt, out):
    """_row_means on the calling thread."""
    _row_means(table, fmt, out)


@njit(inline="always")
def _gather_row_means(means, ids, mask_zero, fmt, bags_per_chunk, means_ahead, out):
    """out[b, l] = means[ids[b, l]]; padding gives 0.  [B][L], reads B*L ids and means.

    Each id's mean is prefetched means_ahead ids ahead (launch.CPU_MEANS_AHEAD):
    the reads are scattered over a [V] vector that is rarely in cache.
    """
    batch, length = ids.shape
    vocab = means.shape[0]
    means_as_rows = means.reshape((vocab, 1))  # a view: what prefetch() takes
    flat_ids = ids.reshape(-1)
    n_chunks = (batch + bags_per_chunk - 1) // bags_per_chunk
    first_bad = batch * length
    for chunk in prange(n_chunks):
        first = chunk * bags_per_chunk
        last = min(batch, first + bags_per_chunk)
        end = last * length
        for p in range(first * length, min(end, first * length + means_ahead)):
            prefetch(means_as_rows, flat_ids[p], 0)
        for b in range(first, last):
            for l in range(length):
                ahead = b * length + l + means_ahead
                if ahead < end:
                    prefetch(means_as_rows, flat_ids[ahead], 0)
                r = ids[b, l]
                if r < 0 or r >= vocab:
                    first_bad = min(first_bad, b * length + l)
                    break
                value = np.float32(0.0) if mask_zero and r == 0 else means[r]
                store(out, b, l, value, fmt)
    return first_bad


@njit(parallel=True, cache=True, nogil=True)
def gather_row_means(means, ids, mask_zero, fmt, bags_per_chunk, means_ahead, out):
    """_gather_row_means on Numba's thread team."""
    return _gather_row_means(means, ids, mask_zero, fmt, bags_per_chunk, means_ahead, out)


@njit(cache=True, nogil=True)
def gather_row_means_serial(means, ids, mask_zero, fmt, bags_per_chunk, means_ahead, out):
    """_gather_row_means on the calling thread."""
    return _gather_row_means(means, ids, mask_zero, fmt, bags_per_chunk, means_ahead, out)


# The serial entry point of each parallel kernel.
SERIAL = {gather_mean_sequence: gather_mean_sequence_serial,
          gather_mean_embedding: gather_mean_embedding_serial,
          row_means: row_means_serial,
          gather_row_means: gather_row_means_serial}
