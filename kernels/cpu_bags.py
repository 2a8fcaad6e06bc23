"""Numba CPU kernels for variable-length (CSR) bags: ``pool(table[values] * weights)`` per bag.

Bag b is ``values[offsets[b]:offsets[b + 1]]`` (with ``weights`` alongside, when
given). One pass over the ids: bounds checked, rows accumulated in float32, the
(B, D) result written in the table's format, never the (N, D) gathered rows.

Balance: the work is split by ids, not by bags. The call's steps are its N ids and
its B bag ends, walked in order as one merge path (Merrill and Garland's CSR SpMV
split, as CUB does it); chunk c takes steps [c * (N + B) // n, (c + 1) * (N + B) // n)
(``split_work``), so every chunk reads at most ceil((N + B) / n) ids and writes at
most as many bags, whatever the bag lengths: one bag of 5,000 ids next to thousands
of 3 is cut across chunks like any other run of ids. A chunk stores the bags that
start and end inside it; a bag cut by chunk boundaries leaves a partial sum in each
chunk it crosses (its tail in the chunk where it starts, a head in the one where it
ends, a tail covering the whole chunk in between), and the calling thread adds those
partials in chunk order after the parallel loop and stores the bag (2 * n rows of D
floats at most: a serial fix-up that costs nothing beside the gather).

Arrays: table [V][D] float32 or uint16 bits of float16/bfloat16 (``fmt``);
values [N] int32/int64; offsets [B + 1] int64; weights [N] float32 (read only when
``weighted``; pass an empty array otherwise); out [B][D] float32 or uint16 bits in
the table's format. Returns the position in ``values`` of the first out-of-range id,
or N when every id is in range; a chunk stops at its first bad id, so the output is
then incomplete and must not be returned (the host raises).

Like kernels/cpu.py: two entry points over one body (parallel, and ``_serial`` on the
calling thread), compiled once per signature and cached on disk; Numba keys that cache
on this file alone, so after editing cpu_rows.py, cpu_scalars.py or cpu.py delete
kernels/__pycache__/cpu_bags.*.nb[ic].
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..spec import Pooling
from .cpu import _prefetch_rows
from .cpu_rows import sum_vector_columns
from .cpu_scalars import store, widen

# The combiner codes as compile-time constants (Numba freezes module globals).
_MEAN = Pooling.MEAN.kernel_code
_SQRTN = Pooling.SQRTN.kernel_code


@njit(cache=True, nogil=True)
def split_work(offsets, n_chunks, bag_bounds, id_bounds):
    """Cut the merge path of N ids and B bag ends into n_chunks equal runs of steps.

    offsets: [B + 1] int64 CSR offsets (validated). bag_bounds, id_bounds: [n_chunks + 1]
    int64, written: chunk c starts with bag_bounds[c] bags complete and id_bounds[c] ids
    read, and ends where chunk c + 1 starts. At step k the state (i, j = k - i) has i the
    largest bag count with offsets[i] + i <= k (a strictly increasing function of i, so a
    binary search); then offsets[i] <= j <= offsets[i + 1].
    """
    batch = offsets.shape[0] - 1
    total_ids = offsets[batch]
    steps = total_ids + batch
    for c in range(n_chunks + 1):
        k = c * steps // n_chunks
        lo = max(0, k - total_ids)  # j = k - i <= N
        hi = min(k, batch)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if offsets[mid] + mid <= k:
                lo = mid
            else:
                hi = mid - 1
        bag_bounds[c] = lo
        id_bounds[c] = k - lo


@njit(inline="always")
def _first_bad(values, lo, hi, vocab):
    """Position of the first id outside [0, vocab) in values[lo:hi], or -1."""
    for p in range(lo, hi):
        r = values[p]
        if r < 0 or r >= vocab:
            return p
    return -1


@njit(inline="always")
def _sum_ids(table, values, weights, weighted, combiner, lo, hi, fmt, rows_ahead, stop, acc):
    """acc[:] = sum over p in [lo, hi) of w[p] * table[values[p], :] in float32 (w = 1 unweighted).  [D]

    Returns the portion's part of the combiner's denominator: sum of w (mean), of w^2
    (sqrtn), 0 (sum). Rows values[p + rows_ahead] are prefetched while row p is summed,
    up to position ``stop`` (the chunk's end). Unweighted rows go through the vector
    passes of kernels/cpu_rows.py; weighted rows and the last D % 16 columns take a
    scalar loop over the columns, which LLVM vectorises (each column is independent).
    """
    dim = table.shape[1]
    if weighted:
        acc[:] = 0.0
        term = np.float32(0.0)
        for p in range(lo, hi):
            _prefetch_rows(table, values, min(stop, p + rows_ahead), min(stop, p + rows_ahead + 1))
            w = weights[p]
            r = values[p]
            for d in range(dim):
                acc[d] += w * widen(table[r, d], fmt)
            if combiner == _SQRTN:
                term += w * w
            else:
                term += w
        return term
    col = sum_vector_columns(table, values[lo:hi], hi - lo, fmt, values, lo + rows_ahead, stop, acc)
    if col < dim:
        acc[col:] = 0.0
        for p in range(lo, hi):
            if col == 0:  # no vector pass prefetched these rows
                _prefetch_rows(table, values, min(stop, p + rows_ahead), min(stop, p + rows_ahead + 1))
            r = values[p]
            for d in range(col, dim):
                acc[d] += widen(table[r, d], fmt)
    return np.float32(hi - lo)


@njit(inline="always")
def _store_bag(out, b, acc, term, combiner, fmt):
    """out[b, :] = acc / denominator, in out's format; a zero denominator gives zeros.

    Denominators as tf.nn.embedding_lookup_sparse's: sum of weights (mean), sqrt of the
    sum of squared weights (sqrtn), 1 (sum); its div_no_nan gives 0 where the
    denominator is 0, which covers empty bags (and weights summing to 0) alike.
    """
    if combiner == _MEAN:
        divisor = term
    elif combiner == _SQRTN:
        divisor = np.sqrt(term)
    else:
        divisor = np.float32(1.0)
    if divisor != 0.0:
        for d in range(out.shape[1]):
            store(out, b, d, acc[d] / divisor, fmt)
    else:
        for d in range(out.shape[1]):
            store(out, b, d, np.float32(0.0), fmt)


@njit(inline="always")
def _embedding_bag(table, values, offsets, weights, weighted, combiner, fmt, n_chunks, rows_ahead, out):
    """out[b, :] = combiner over p in bag b of weights[p] * table[values[p], :].  [B][D]"""
    batch = offsets.shape[0] - 1
    total_ids = offsets[batch]
    vocab, dim = table.shape
    bag_bounds = np.empty(n_chunks + 1, dtype=np.int64)
    id_bounds = np.empty(n_chunks + 1, dtype=np.int64)
    split_work(offsets, n_chunks, bag_bounds, id_bounds)
    # Partial sums of the bags cut by chunk boundaries (see the module docstring).
    heads = np.zeros((n_chunks, dim), dtype=np.float32)   # [n][D], the bag ending in chunk c
    tails = np.zeros((n_chunks, dim), dtype=np.float32)   # [n][D], the bag open at chunk c's end
    head_terms = np.zeros(n_chunks, dtype=np.float32)
    tail_terms = np.zeros(n_chunks, dtype=np.float32)
    first_bad = np.full(n_chunks, total_ids, dtype=np.int64)
    for c in prange(n_chunks):
        acc = np.empty(dim, dtype=np.float32)   # [D], one per chunk
        i0, j0 = bag_bounds[c], id_bounds[c]
        i1, j1 = bag_bounds[c + 1], id_bounds[c + 1]
        _prefetch_rows(table, values, j0, min(j1, j0 + rows_ahead))
        for b in range(i0, min(i1 + 1, batch)):   # bags ending here, then the one left open
            lo = max(offsets[b], j0)
            hi = offsets[b + 1] if b < i1 else j1
            bad = _first_bad(values, lo, hi, vocab)
            if bad >= 0:
                first_bad[c] = bad
                break
            # Where the bag's sum goes: a partial (one call site, so the vector passes
            # are inlined once) or the chunk's accumulator for a bag stored here.
            if b == i1:  # open at the chunk's end: its rest lies in later chunks
                target = tails[c]
            elif offsets[b] < j0:  # ends here, began in an earlier chunk
                target = heads[c]
            else:
                target = acc
            term = _sum_ids(table, values, weights, weighted, combiner, lo, hi, fmt, rows_ahead, j1, target)
            if b == i1:
                tail_terms[c] = term
            elif offsets[b] < j0:
                head_terms[c] = term
            else:
                _store_bag(out, b, acc, term, combiner, fmt)
    bad = first_bad.min()  # chunks cover the ids in order: the least is the first bad id
    if bad < total_ids:
        return bad
    # The cut bags, in chunk order on this thread: carry = the open bag's sum so far.
    carry = np.zeros(dim, dtype=np.float32)
    carry_term = np.float32(0.0)
    for c in range(n_chunks):
        i0, i1 = bag_bounds[c], bag_bounds[c + 1]
        if i1 > i0:  # a bag ended in chunk c: bag i0, stored above unless it began earlier
            if offsets[i0] < id_bounds[c]:
                for d in range(dim):
                    carry[d] += heads[c, d]
                _store_bag(out, i0, carry, carry_term + head_terms[c], combiner, fmt)
            carry[:] = tails[c]
            carry_term = tail_terms[c]
        else:  # the whole chunk inside one bag
            for d in range(dim):
                carry[d] += tails[c, d]
            carry_term += tail_terms[c]
    return total_ids


@njit(parallel=True, cache=True, nogil=True)
def embedding_bag(table, values, offsets, weights, weighted, combiner, fmt, n_chunks, rows_ahead, out):
    """_embedding_bag on Numba's thread team."""
    return _embedding_bag(table, values, offsets, weights, weighted, combiner, fmt, n_chunks,
                          rows_ahead, out)


@njit(cache=True, nogil=True)
def embedding_bag_serial(table, values, offsets, weights, weighted, combiner, fmt, n_chunks,
                         rows_ahead, out):
    """_embedding_bag on the calling thread."""
    return _embedding_bag(table, values, offsets, weights, weighted, combiner, fmt, n_chunks,
                          rows_ahead, out)


@njit(cache=True, nogil=True)
def offsets_of_rows(rows, offsets):
    """CSR offsets from the row of each id of a 2-D SparseTensor, in one pass.  [B + 1]

    rows: [N] int64, the ids' rows (``indices[:, 0]``, any stride), which must be in
    canonical order (non-decreasing) and in [0, B). offsets: [B + 1] int64, written:
    offsets[b] = the position of the first id in a row >= b, offsets[B] = N. Returns -1,
    or the first position whose row is out of order or outside [0, B) (the offsets are
    then incomplete).
    """
    batch = offsets.shape[0] - 1
    offsets[0] = 0
    b = 0       # offsets[:b + 1] are written
    last = 0    # the row of the previous id
    for p in range(rows.shape[0]):
        r = rows[p]
        if r < last or r >= batch:
            return p
        while b < r:
            b += 1
            offsets[b] = p
        last = r
    while b < batch:
        b += 1
        offsets[b] = rows.shape[0]
    return -1
