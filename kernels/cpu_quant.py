"""Numba CPU kernels for row-wise quantized tables (python/fused_embedding/quantized.py).

Rows are dequantised as they are read, never written out: a bag's pooled row is
``sum_k w_k (q_k * scale_k + bias_k) = sum_k (w_k scale_k) q_k + sum_k w_k bias_k``, so each
row costs one multiply-add per value (its scale folded into the weight) and one scalar
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
from numba import njit, prange

from ..semantics import FORMAT_FLOAT32
from ..spec import FORMAT_INT4_ROWWISE, FORMAT_KERAS_INT8, Pooling
from .cpu import _prefetch_rows
from .cpu_bags import _first_bad, _store_bag

_SQRTN = Pooling.SQRTN.kernel_code  # compile-time constants (Numba freezes module globals)
_INT4 = FORMAT_INT4_ROWWISE
_KERAS = FORMAT_KERAS_INT8


@njit(inline="always")
def _scale_bias(params, r, fmt):
    """(multiplier of q, bias) of row r in float32."""
    if fmt == _KERAS:
        return np.float32(1.0) / params[r, 0], np.float32(0.0)
    return params[r, 0], params[r, 1]


@njit(inline="always", fastmath={"contract"})
def _add_scaled_row(data, r, scale, fmt, acc):
    """acc += scale * q of row r.  int4: acc in nibble order, acc[j] the low nibble of byte j
    and acc[C + j] its high one (two unit-stride loops LLVM vectorises); ``_store_pooled``
    puts the columns back in order."""
    columns = data.shape[1]
    if fmt == _INT4:
        for j in range(columns):
            byte = data[r, j]
            acc[j] += scale * np.float32(byte & 15)
            acc[columns + j] += scale * np.float32(byte >> 4)
    else:
        for j in range(columns):
            acc[j] += scale * np.float32(data[r, j])


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
    for chunk in prange(n_chunks):
        acc = np.empty(dim, dtype=np.float32)      # [D], one per chunk
        ordered = np.empty(dim, dtype=np.float32)  # [D], int4's columns in order
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
            acc[:] = 0.0
            bias_sum = np.float32(0.0)
            term = np.float32(0.0)
            for p in range(lo, hi):
                _prefetch_row(data, params, values, p + rows_ahead, end)
                r = values[p]
                if r == padding_id:
                    continue
                w = weights[p] if weighted else np.float32(1.0)
                scale, bias = _scale_bias(params, r, fmt)
                _add_scaled_row(data, r, w * scale, fmt, acc)
                bias_sum += w * bias
                term += w * w if combiner == _SQRTN else w
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
