"""Numba CPU kernels for row-wise quantized tables (python/fused_embedding/quantized.py).

Rows are dequantised as they are read, never written out: a bag's pooled row is
``sum_k w_k (q_k * scale_k + bias_k) = sum_k (w_k scale_k) q_k + sum_k w_k bias_k``, so each
row costs a multiply and an add per value (its scale folded into the weight; 16 values a vector, the sums in registers) and one scalar
add for its bias, all in float32. Keras' layout (value = q / scale) multiplies by the
row's reciprocal scale: within two float32 roundings of Keras' own quotient.

Arrays: data [V][C] uint8 (INT8_ROWWISE, C = D; INT4_ROWWISE, C = D / 2, column 2j in
the low nibble of byte j) or int8 (KERAS_INT8, C = D); params [V][P] float32, per row
(scale, bias) (P = 2) or Keras' scale (P = 1); values [N] int32/int64 and offsets
[B + 1] int64 as CSR (dense (B, L) ids are CSR with offsets b * L); weights [N]
float32, read only when ``weighted``; padding_id: an id that is skipped and not
counted (dense mask_zero: 0), -1 for none; out [B][D] float32 (pooled) or [B][L]
float32 (axis 2). ``fmt``: the TableFormat's kernel code.

Work is split as kernels/cpu.py splits it: chunks of whole bags
(``launch.cpu_bags_per_chunk``), one parallel iteration each, rows prefetched
``rows_ahead`` ids ahead (data and parameters). Bounds: a bag with an id outside [0, V)
is not stored; the kernels return the least position of a bad id in values (for dense
ids the flat position b * L + l: the first in row order), or N when every id is in
range, and the host raises. Unlike the float bags kernel (kernels/cpu_bags.py) a bag is
never cut across chunks: one very long bag next to short ones keeps one thread busy.

Two entry points over each body (parallel, and ``_serial`` on the calling thread),
cached on disk; Numba keys the cache on this file alone, so after editing cpu.py or
cpu_bags.py delete kernels/__pycache__/cpu_quant.*.nb[ic].
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..semantics import FORMAT_FLOAT32
from ..spec import FORMAT_INT4_ROWWISE, FORMAT_KERAS_INT8, Pooling
from .cpu import _prefetch_rows
from .cpu_bags import _first_bad, _store_bag
from .cpu_rows import LANES

_SQRTN = Pooling.SQRTN.kernel_code  # compile-time constants (Numba freezes module globals)
_INT4 = FORMAT_INT4_ROWWISE
_KERAS = FORMAT_KERAS_INT8


@njit(inline="always")
def _scale_bias(params, r, fmt):
    """(multiplier of q, bias) of row r in float32."""
    if fmt == _KERAS:
        return np.float32(1.0) / params[r, 0], np.float32(0.0)
    return params[r, 0], params[r, 1]


_UNSIGNED, _SIGNED, _NIBBLES = 0, 1, 2  # how a loaded byte becomes values: uint8, int8, two 4-bit


def _make_scaled_rows(n_loads: int, kind: int):
    """A vector pass: for the bytes [col, col + 16 n_loads) of each row, acc += mults[k] *
    q(data[rows[k], ...]) over k < count, the sums in <16 x float> registers across all the
    bag's rows (as kernels/cpu_rows.py's passes keep theirs) and stored once. _NIBBLES
    loads give two vectors each: low nibbles to acc[col + i], high ones to acc[C + col + i]
    (C = data's columns)."""

    @intrinsic
    def scaled_rows(typingctx, data, rows, mults, count, col, acc):
        # any layout: a row's bytes must be contiguous (QuantizedTable checks it), rows a stride apart
        if not (isinstance(data, types.Array) and data.ndim == 2 and data.layout in ("C", "A")
                and data.dtype in (types.uint8, types.int8)):
            return None

        def codegen(context, builder, sig, args):
            data_v, rows_v, mults_v, count_v, col_v, acc_v = args
            data_t, rows_t, mults_t, count_t, col_t, acc_t = sig.args
            i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
            vec_i8, vec_i32, vec_f32 = (ir.VectorType(t, LANES) for t in (ir.IntType(8), i32, f32))
            data_a = context.make_array(data_t)(context, builder, data_v)
            rows_a = context.make_array(rows_t)(context, builder, rows_v)
            mults_a = context.make_array(mults_t)(context, builder, mults_v)
            acc_a = context.make_array(acc_t)(context, builder, acc_v)
            stride = builder.extract_value(data_a.strides, 0)
            columns = builder.extract_value(data_a.shape, 1)
            count_i = context.cast(builder, count_v, count_t, types.int64)
            col_i = context.cast(builder, col_v, col_t, types.int64)
            base = builder.bitcast(data_a.data, ir.IntType(8).as_pointer())
            n_accs = n_loads * (2 if kind == _NIBBLES else 1)

            entry = builder.basic_block
            loop = builder.append_basic_block("qrows.loop")
            body = builder.append_basic_block("qrows.body")
            done = builder.append_basic_block("qrows.done")
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(ir.Constant(i64, 0), entry)
            accs = []
            for _ in range(n_accs):
                accs.append(builder.phi(vec_f32))
                accs[-1].add_incoming(ir.Constant(vec_f32, None), entry)
            builder.cbranch(builder.icmp_signed("<", k, count_i), body, done)

            builder.position_at_end(body)
            row = context.cast(builder, builder.load(builder.gep(rows_a.data, [k])), rows_t.dtype, types.int64)
            row_ptr = builder.gep(base, [builder.add(builder.mul(row, stride), col_i)])
            mult = builder.load(builder.gep(mults_a.data, [k]))
            mult_v = builder.shuffle_vector(builder.insert_element(ir.Constant(vec_f32, ir.Undefined), mult,
                                                                   ir.Constant(i32, 0)),
                                            ir.Constant(vec_f32, ir.Undefined),
                                            ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))
            new_accs = []
            for v in range(n_loads):
                ptr = builder.bitcast(builder.gep(row_ptr, [ir.Constant(i64, v * LANES)]), vec_i8.as_pointer())
                raw = builder.load(ptr, align=1)
                if kind == _SIGNED:
                    parts = [builder.sext(raw, vec_i32)]
                elif kind == _UNSIGNED:
                    parts = [builder.zext(raw, vec_i32)]
                else:
                    wide = builder.zext(raw, vec_i32)
                    parts = [builder.and_(wide, ir.Constant(vec_i32, [15] * LANES)),
                             builder.lshr(wide, ir.Constant(vec_i32, [4] * LANES))]
                for h, part in enumerate(parts):
                    value = builder.sitofp(part, vec_f32)
                    # contract: one fused multiply-add (one rounding, not two)
                    product = builder.fmul(mult_v, value, flags=("contract",))
                    new_accs.append((v + h * n_loads, builder.fadd(accs[v + h * n_loads], product,
                                                                   flags=("contract",))))
            k.add_incoming(builder.add(k, ir.Constant(i64, 1)), body)
            for index, value in new_accs:
                accs[index].add_incoming(value, body)
            builder.branch(loop)

            builder.position_at_end(done)
            acc_base = builder.bitcast(acc_a.data, f32.as_pointer())
            for index in range(n_accs):
                v, high = index % n_loads, index >= n_loads
                start = builder.add(col_i, ir.Constant(i64, v * LANES))
                if high:
                    start = builder.add(start, columns)
                ptr = builder.bitcast(builder.gep(acc_base, [start]), vec_f32.as_pointer())
                builder.store(accs[index], ptr, align=4)
            return context.get_dummy_value()

        return types.none(data, rows, mults, count, col, acc), codegen
    return scaled_rows


def _make_vector_columns(kind: int):
    """The vector passes of one kind over the leading columns that fill whole 16-byte
    loads: 128 bytes a pass, then 64, 32, 16. Returns the first byte column left over."""
    x8, x4, x2, x1 = (_make_scaled_rows(n, kind) for n in (8, 4, 2, 1))

    @njit(inline="always")
    def vector_columns(data, rows, mults, count, acc):
        columns = data.shape[1]
        col = 0
        while col + 8 * LANES <= columns:
            x8(data, rows, mults, count, col, acc)
            col += 8 * LANES
        if col + 4 * LANES <= columns:
            x4(data, rows, mults, count, col, acc)
            col += 4 * LANES
        if col + 2 * LANES <= columns:
            x2(data, rows, mults, count, col, acc)
            col += 2 * LANES
        if col + LANES <= columns:
            x1(data, rows, mults, count, col, acc)
            col += LANES
        return col
    return vector_columns


_unsigned_columns = _make_vector_columns(_UNSIGNED)
_signed_columns = _make_vector_columns(_SIGNED)
_nibble_columns = _make_vector_columns(_NIBBLES)


@njit(inline="always")
def _sum_scaled_rows(data, rows, mults, count, fmt, acc):
    """acc = sum over k < count of mults[k] * q(data[rows[k]]) (int4: in nibble order)."""
    if fmt == _INT4:
        col = _nibble_columns(data, rows, mults, count, acc)
    elif fmt == _KERAS:
        col = _signed_columns(data, rows, mults, count, acc)
    else:
        col = _unsigned_columns(data, rows, mults, count, acc)
    columns = data.shape[1]
    if col < columns:  # the last C % 16 byte columns
        acc[col:columns] = 0.0
        if fmt == _INT4:
            acc[columns + col:] = 0.0
        for k in range(count):
            r = rows[k]
            mult = mults[k]
            if fmt == _INT4:
                for j in range(col, columns):
                    byte = data[r, j]
                    acc[j] += mult * np.float32(byte & 15)
                    acc[columns + j] += mult * np.float32(byte >> 4)
            else:
                for j in range(col, columns):
                    acc[j] += mult * np.float32(data[r, j])


@njit(inline="always")
def _prefetch_row(data, params, values, p, stop):
    if p < stop:
        _prefetch_rows(data, values, p, p + 1)
        _prefetch_rows(params, values, p, p + 1)


@njit(inline="always")
def _store_pooled(out, b, acc, bias_sum, term, combiner, fmt, ordered):
    """out[b, :] = (acc + bias_sum) / the combiner's denominator (``_store_bag``'s rule);
    ``ordered``: scratch [D] for int4's columns back in order."""
    dim = out.shape[1]
    if fmt == _INT4:
        half = dim // 2
        for j in range(half):
            ordered[2 * j] = acc[j] + bias_sum
            ordered[2 * j + 1] = acc[half + j] + bias_sum
        _store_bag(out, b, ordered, term, combiner, FORMAT_FLOAT32)
    else:
        for d in range(dim):
            acc[d] += bias_sum
        _store_bag(out, b, acc, term, combiner, FORMAT_FLOAT32)


@njit(inline="always")
def _pool_quantized(data, params, values, offsets, weights, weighted, padding_id, combiner, fmt,
                    bags_per_chunk, rows_ahead, out):
    """out[b, :] = combiner over p in bag b (ids other than padding_id) of
    weights[p] * dequantised data[values[p]].  [B][D]"""
    batch = offsets.shape[0] - 1
    vocab = data.shape[0]
    dim = out.shape[1]
    n_chunks = (batch + bags_per_chunk - 1) // bags_per_chunk
    first_bad = offsets[batch]
    longest = 0
    for b in range(batch):
        longest = max(longest, offsets[b + 1] - offsets[b])
    for chunk in prange(n_chunks):
        acc = np.empty(dim, dtype=np.float32)      # [D], one per chunk
        ordered = np.empty(dim, dtype=np.float32)  # [D], int4's columns in order
        rows = np.empty(longest, dtype=np.int64)   # the bag's counted ids
        mults = np.empty(longest, dtype=np.float32)  # their w * scale
        first = chunk * bags_per_chunk
        last = min(batch, first + bags_per_chunk)
        start, end = offsets[first], offsets[last]
        for p in range(start, min(end, start + rows_ahead)):
            _prefetch_row(data, params, values, p, end)
        for b in range(first, last):
            lo, hi = offsets[b], offsets[b + 1]
            bad = _first_bad(values, lo, hi, vocab)
            if bad >= 0:
                first_bad = min(first_bad, bad)
                continue
            # A scalar pass over the bag's ids (parameters, weights, the rows' prefetch as
            # far ahead of the vector passes as they are long), then the vector passes.
            bias_sum = np.float32(0.0)
            term = np.float32(0.0)
            count = 0
            for p in range(lo, hi):
                _prefetch_row(data, params, values, p + rows_ahead, end)
                r = values[p]
                if r == padding_id:
                    continue
                w = weights[p] if weighted else np.float32(1.0)
                scale, bias = _scale_bias(params, r, fmt)
                rows[count] = r
                mults[count] = w * scale
                count += 1
                bias_sum += w * bias
                term += w * w if combiner == _SQRTN else w
            _sum_scaled_rows(data, rows, mults, count, fmt, acc)
            _store_pooled(out, b, acc, bias_sum, term, combiner, fmt, ordered)
    return first_bad


@njit(parallel=True, cache=True, nogil=True)
def pool_quantized(data, params, values, offsets, weights, weighted, padding_id, combiner, fmt,
                   bags_per_chunk, rows_ahead, out):
    """_pool_quantized on Numba's thread team."""
    return _pool_quantized(data, params, values, offsets, weights, weighted, padding_id, combiner, fmt,
                           bags_per_chunk, rows_ahead, out)


@njit(cache=True, nogil=True)
def pool_quantized_serial(data, params, values, offsets, weights, weighted, padding_id, combiner, fmt,
                          bags_per_chunk, rows_ahead, out):
    """_pool_quantized on the calling thread."""
    return _pool_quantized(data, params, values, offsets, weights, weighted, padding_id, combiner, fmt,
                           bags_per_chunk, rows_ahead, out)


@njit(inline="always")
def _quantized_row_mean(data, params, r, fmt, dim):
    """Mean over the D values of row r: scale * (sum of q) / D + bias, the q summed exactly
    as integers (below 2^24 for D < 65,793, so exact in float32 too)."""
    total = 0
    if fmt == _INT4:
        for j in range(data.shape[1]):
            byte = np.int32(data[r, j])
            total += (byte & 15) + (byte >> 4)
    else:
        for j in range(data.shape[1]):
            total += np.int32(data[r, j])
    scale, bias = _scale_bias(params, r, fmt)
    return scale * np.float32(total) / np.float32(dim) + bias


@njit(inline="always")
def _gather_quantized_means(data, params, ids, padding_id, fmt, bags_per_chunk, rows_ahead, out):
    """out[b, l] = mean over d of dequantised data[ids[b, l]]; padding gives 0.  [B][L]"""
    batch, length = ids.shape
    vocab = data.shape[0]
    dim = data.shape[1] * 2 if fmt == _INT4 else data.shape[1]
    flat_ids = ids.reshape(-1)
    n_chunks = (batch + bags_per_chunk - 1) // bags_per_chunk
    first_bad = batch * length
    for chunk in prange(n_chunks):
        first = chunk * bags_per_chunk
        last = min(batch, first + bags_per_chunk)
        end = last * length
        for p in range(first * length, min(end, first * length + rows_ahead)):
            _prefetch_row(data, params, flat_ids, p, end)
        for b in range(first, last):
            for l in range(length):
                _prefetch_row(data, params, flat_ids, b * length + l + rows_ahead, end)
                r = ids[b, l]
                if r < 0 or r >= vocab:
                    first_bad = min(first_bad, b * length + l)
                    break
                if r == padding_id:
                    out[b, l] = 0.0
                else:
                    out[b, l] = _quantized_row_mean(data, params, r, fmt, dim)
    return first_bad


@njit(parallel=True, cache=True, nogil=True)
def gather_quantized_means(data, params, ids, padding_id, fmt, bags_per_chunk, rows_ahead, out):
    """_gather_quantized_means on Numba's thread team."""
    return _gather_quantized_means(data, params, ids, padding_id, fmt, bags_per_chunk, rows_ahead, out)


@njit(cache=True, nogil=True)
def gather_quantized_means_serial(data, params, ids, padding_id, fmt, bags_per_chunk, rows_ahead, out):
    """_gather_quantized_means on the calling thread."""
    return _gather_quantized_means(data, params, ids, padding_id, fmt, bags_per_chunk, rows_ahead, out)
