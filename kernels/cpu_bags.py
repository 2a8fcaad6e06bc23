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
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..launch import CACHE_LINE_BYTES
from ..semantics import FORMAT_BFLOAT16, FORMAT_FLOAT16, FORMAT_FLOAT32
from ..spec import Pooling
from .cpu import _prefetch_rows
from .cpu_rows import LANES, _widen, sum_vector_columns
from .cpu_scalars import LOCALITY_KEEP, store, widen

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


def _make_weighted_sum_rows(n_vectors: int, fmt: int, weighted: bool = True):
    """The weighted twin of cpu_rows' vector pass: acc[col:col + 16*n] = sum over k < count of
    weights[k] * table[rows[k], col:col + 16*n] (float32), the accumulators in n <16 x float>
    registers, the same columns of row ahead_ids[ahead_start + k] prefetched while row k is
    summed (if ahead_start + k < ahead_stop). A scalar loop over the columns keeps its
    accumulators in memory: a load and a store per element per row (measured 1.6x slower
    than torch's weighted sum at D=64 on one thread; benchmarks/NOTES.md)."""

    @intrinsic
    def weighted_sum_rows(typingctx, table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc):
        if not (isinstance(table, types.Array) and table.ndim == 2 and table.layout == "C"
                and table.dtype in (types.float32, types.uint16) and weights.dtype == types.float32):
            return None

        def codegen(context, builder, sig, args):
            (table_v, rows_v, weights_v, count_v, col_v, ahead_v, start_v, stop_v, acc_v) = args
            (table_t, rows_t, weights_t, count_t, col_t, ahead_t, start_t, stop_t, acc_t) = sig.args
            i64, i32 = ir.IntType(64), ir.IntType(32)
            i8p = ir.IntType(8).as_pointer()

            def as_i64(value, ty):
                return context.cast(builder, value, ty, types.int64)

            table_a = context.make_array(table_t)(context, builder, table_v)
            rows_a = context.make_array(rows_t)(context, builder, rows_v)
            weights_a = context.make_array(weights_t)(context, builder, weights_v)
            ahead_a = context.make_array(ahead_t)(context, builder, ahead_v)
            acc_a = context.make_array(acc_t)(context, builder, acc_v)
            row_stride = builder.extract_value(table_a.strides, 0)
            weight_stride = builder.extract_value(weights_a.strides, 0)
            elem_type = context.get_data_type(table_t.dtype)
            item = elem_type.width // 8 if isinstance(elem_type, ir.IntType) else 4
            vec_raw = ir.VectorType(elem_type, LANES)
            vec_f32 = ir.VectorType(ir.FloatType(), LANES)
            count_i = as_i64(count_v, count_t)
            col_bytes = builder.mul(as_i64(col_v, col_t), ir.Constant(i64, item))
            start_i, stop_i = as_i64(start_v, start_t), as_i64(stop_v, stop_t)
            base = builder.bitcast(table_a.data, i8p)
            weights_base = builder.bitcast(weights_a.data, i8p)
            pf_fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")

            def prefetch_at(ptr, offset):  # read, all cache levels (cpu_scalars), data
                builder.call(pf_fn, [builder.gep(ptr, [ir.Constant(i64, offset)]), ir.Constant(i32, 0),
                                     ir.Constant(i32, LOCALITY_KEEP), ir.Constant(i32, 1)])

            # As cpu_rows: the extra line of a block that straddles lines, on unaligned tables only.
            misalignment = builder.or_(builder.or_(builder.ptrtoint(base, i64), row_stride), col_bytes)
            blocks_straddle = builder.icmp_unsigned(
                "!=", builder.and_(misalignment, ir.Constant(i64, CACHE_LINE_BYTES - 1)), ir.Constant(i64, 0))

            entry = builder.basic_block
            loop = builder.append_basic_block("wrows.loop")
            body = builder.append_basic_block("wrows.body")
            prefetch_bb = builder.append_basic_block("wrows.prefetch")
            prefetch_tail_bb = builder.append_basic_block("wrows.prefetch_tail")
            after_prefetch = builder.append_basic_block("wrows.after_prefetch")
            done = builder.append_basic_block("wrows.done")
            builder.branch(loop)

            builder.position_at_end(loop)
            k = builder.phi(i64, "k")
            k.add_incoming(ir.Constant(i64, 0), entry)
            accs = []
            for _ in range(n_vectors):
                phi = builder.phi(vec_f32)
                phi.add_incoming(ir.Constant(vec_f32, None), entry)
                accs.append(phi)
            builder.cbranch(builder.icmp_signed("<", k, count_i), body, done)

            builder.position_at_end(body)
            row = builder.load(builder.gep(rows_a.data, [k]))
            row_ptr = builder.gep(base, [builder.add(builder.mul(as_i64(row, rows_t.dtype), row_stride),
                                                     col_bytes)])
            if weighted:
                w_ptr = builder.bitcast(builder.gep(weights_base, [builder.mul(k, weight_stride)]),
                                        ir.FloatType().as_pointer())
                w_one = builder.insert_element(ir.Constant(vec_f32, ir.Undefined), builder.load(w_ptr),
                                               ir.Constant(i32, 0))
                w_vec = builder.shuffle_vector(w_one, ir.Constant(vec_f32, ir.Undefined),
                                               ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))
            new_accs = []
            for v in range(n_vectors):
                ptr = builder.bitcast(builder.gep(row_ptr, [ir.Constant(i64, v * LANES * item)]),
                                      vec_raw.as_pointer())
                value = _widen(builder, builder.load(ptr, align=item), elem_type, fmt)
                new_accs.append(builder.fadd(accs[v], builder.fmul(w_vec, value) if weighted else value))
            ahead_pos = builder.add(start_i, k)
            builder.cbranch(builder.icmp_signed("<", ahead_pos, stop_i), prefetch_bb, after_prefetch)

            builder.position_at_end(prefetch_bb)
            ahead_row = as_i64(builder.load(builder.gep(ahead_a.data, [ahead_pos])), ahead_t.dtype)
            ahead_ptr = builder.gep(base, [builder.add(builder.mul(ahead_row, row_stride), col_bytes)])
            pass_bytes = n_vectors * LANES * item
            for offset in range(0, pass_bytes, CACHE_LINE_BYTES):
                prefetch_at(ahead_ptr, offset)
            builder.cbranch(blocks_straddle, prefetch_tail_bb, after_prefetch)

            builder.position_at_end(prefetch_tail_bb)
            prefetch_at(ahead_ptr, pass_bytes - 1)
            builder.branch(after_prefetch)

            builder.position_at_end(after_prefetch)
            k_next = builder.add(k, ir.Constant(i64, 1))
            k.add_incoming(k_next, after_prefetch)
            for phi, value in zip(accs, new_accs):
                phi.add_incoming(value, after_prefetch)
            builder.branch(loop)

            builder.position_at_end(done)
            acc_base = builder.bitcast(acc_a.data, i8p)
            acc_col = builder.mul(as_i64(col_v, col_t), ir.Constant(i64, 4))
            for v in range(n_vectors):
                ptr = builder.gep(acc_base, [builder.add(acc_col, ir.Constant(i64, v * LANES * 4))])
                builder.store(accs[v], builder.bitcast(ptr, vec_f32.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc), codegen
    return weighted_sum_rows


def _make_weighted_sum_columns(fmt: int, weighted: bool = True):
    """Weighted rows over the columns filling whole vectors: 128 columns a pass, then one
    pass over the rest (as cpu_rows' unweighted passes)."""
    x1, x2, x3, x4, x5, x6, x7, x8 = (_make_weighted_sum_rows(n, fmt, weighted) for n in range(1, 9))

    @njit(inline="always")
    def weighted_sum_columns(table, rows, weights, count, ahead_ids, ahead_start, ahead_stop, acc):
        dim = table.shape[1]
        col = 0
        while col + 8 * LANES <= dim:
            x8(table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc)
            col += 8 * LANES
        vectors = (dim - col) // LANES
        if vectors == 7:
            x7(table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 6:
            x6(table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 5:
            x5(table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 4:
            x4(table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 3:
            x3(table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 2:
            x2(table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 1:
            x1(table, rows, weights, count, col, ahead_ids, ahead_start, ahead_stop, acc)
        return col + vectors * LANES
    return weighted_sum_columns


_weighted_float32 = _make_weighted_sum_columns(FORMAT_FLOAT32)
_weighted_float16 = _make_weighted_sum_columns(FORMAT_FLOAT16)
_weighted_bfloat16 = _make_weighted_sum_columns(FORMAT_BFLOAT16)
_plain_float32 = _make_weighted_sum_columns(FORMAT_FLOAT32, False)
_plain_float16 = _make_weighted_sum_columns(FORMAT_FLOAT16, False)
_plain_bfloat16 = _make_weighted_sum_columns(FORMAT_BFLOAT16, False)


def _by_table_format(float32_rows, float16_rows, bfloat16_rows):
    """An overload body that hands a C table to the row pass compiled for its format (the
    16-bit formats share one element type, so fmt picks between them), and leaves every
    column to the scalar pass for any other layout."""
    def implementation(table, rows, weights, count, fmt, ahead_ids, ahead_start, ahead_stop, acc):
        if not (isinstance(table, types.Array) and table.layout == "C"):
            return lambda table, rows, weights, count, fmt, ahead_ids, ahead_start, ahead_stop, acc: 0
        if table.dtype == types.float32:
            def float32_table(table, rows, weights, count, fmt, ahead_ids, ahead_start, ahead_stop, acc):
                return float32_rows(table, rows, weights, count, ahead_ids, ahead_start, ahead_stop, acc)
            return float32_table

        def half_width_table(table, rows, weights, count, fmt, ahead_ids, ahead_start, ahead_stop, acc):
            if fmt == FORMAT_BFLOAT16:
                return bfloat16_rows(table, rows, weights, count, ahead_ids, ahead_start, ahead_stop, acc)
            return float16_rows(table, rows, weights, count, ahead_ids, ahead_start, ahead_stop, acc)
        return half_width_table
    return implementation


def plain_vector_columns(table, rows, weights, count, fmt, ahead_ids, ahead_start, ahead_stop, acc):
    """weighted_vector_columns with every weight 1 (weights is not read)."""


overload(plain_vector_columns, inline="always")(
    _by_table_format(_plain_float32, _plain_float16, _plain_bfloat16))


def weighted_vector_columns(table, rows, weights, count, fmt, ahead_ids, ahead_start, ahead_stop, acc):
    """Sum the bag's weighted rows into acc for the leading columns that fill whole vectors;
    returns the first column left for a scalar pass (all of them for a non-C table)."""


overload(weighted_vector_columns, inline="always")(
    _by_table_format(_weighted_float32, _weighted_float16, _weighted_bfloat16))


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
    up to position ``stop`` (the chunk's end). Weighted rows go through the vector passes
    here (weighted_vector_columns), whose last D % 16 columns take a scalar loop over the
    columns; unweighted rows through their twin here (plain_vector_columns) when D is a
    multiple of 16, else through kernels/cpu_rows.py's passes (the last vector masked).
    Every pass prefetches with the keep-in-cache hint (cpu_scalars): the read-once
    hint (prefetchnta) evicted rows that skewed ids read again (one thread, D=256,
    rows in cache: 0.23x torch's speed with it, 0.99x with the keep hint).
    """
    dim = table.shape[1]
    if weighted:
        col = weighted_vector_columns(table, values[lo:hi], weights[lo:hi], hi - lo, fmt, values,
                                      lo + rows_ahead, stop, acc)
        if col < dim:
            acc[col:] = 0.0
            for p in range(lo, hi):
                if col == 0:  # no vector pass prefetched these rows
                    _prefetch_rows(table, values, min(stop, p + rows_ahead), min(stop, p + rows_ahead + 1))
                w = weights[p]
                r = values[p]
                for d in range(col, dim):
                    acc[d] += w * widen(table[r, d], fmt)
        term = np.float32(0.0)
        if combiner == _SQRTN:
            for p in range(lo, hi):
                term += weights[p] * weights[p]
        elif combiner == _MEAN:
            for p in range(lo, hi):
                term += weights[p]
        return term
    if dim % LANES == 0:
        col = plain_vector_columns(table, values[lo:hi], weights, hi - lo, fmt, values, lo + rows_ahead,
                                   stop, acc)
    else:
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
