"""Numba CUDA kernel for CSR bags: ``combiner(table[values[offsets[b]:offsets[b + 1]]] * weights)``.

The dense axis-1 kernel's layout (kernels/cuda.py, launch.gpu_launch): a group of lanes
per bag, each lane K words of the row, R rows in flight; bag b's ids are
``values[offsets[b]:offsets[b + 1]]``, read by every lane of the group (one broadcast
load from L1). Each row is scaled by its weight (1 when unweighted) and the bag's sum
divided by the combiner's normaliser: the weights' sum (mean), the square root of the
squared weights' sum (sqrtn), or 1 (sum); a zero normaliser gives zeros (TF's
div_no_nan), and so does an empty bag. A bad id lowers ``bad_position`` to its
position in ``values`` with an atomic min, as the dense kernels do. Runs unchanged
under the CUDA simulator (no warp shuffles).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, int64

from ..launch import GPU_BLOCK_THREADS as BLOCK_THREADS
from ..semantics import FORMAT_FLOAT32
from ..spec import Pooling
from .cuda import BUILT_KERNELS, _element_reader, _element_writer

# The kernels' pooling codes: spec.Pooling's kernel_code, as device code compares them.
POOLING_MEAN, POOLING_SUM, POOLING_SQRTN = (p.kernel_code for p in (Pooling.MEAN, Pooling.SUM, Pooling.SQRTN))


@functools.lru_cache(maxsize=None)
def make_gather_bags(fmt: int, word_dtype: str, lanes: int, words_per_lane: int, rows_in_flight: int,
                     pooling: int, weighted: bool):
    """The CSR kernel for one (format, word dtype, lanes per bag, words per lane, rows in
    flight, pooling code, weighted). Launch: grid (ceil(B / bags_per_block), column tiles),
    block BLOCK_THREADS (launch.gpu_launch for axis 1)."""
    word = np.dtype(word_dtype)
    elements = word.itemsize // (4 if fmt == FORMAT_FLOAT32 else 2)
    read = _element_reader(fmt, elements, word.itemsize * 8)
    write = _element_writer(fmt)
    word_type = word.type
    G, K, E, R = lanes, words_per_lane, elements, rows_in_flight
    bags_per_block = BLOCK_THREADS // G
    tile_words = G * K
    accumulators = K * E

    @cuda.jit
    def gather_bags(words, values, offsets, weights, out, bad_position):
        """out[b, d] = combine over i in bag b of weights[i] * table[values[i], d].

        words [V][W] (the table as words); values [N] int32/int64; offsets [B + 1] int64;
        weights [N] float32 (read only when weighted); out [B][D] float32, float16 or
        uint16 bfloat16 bits; bad_position [1] int64, >= N on entry.
        """
        batch = offsets.shape[0] - 1
        vocab, n_words = words.shape
        lane = cuda.threadIdx.x % G
        slot = cuda.threadIdx.x // G
        b = int64(cuda.blockIdx.x) * bags_per_block + slot
        if b >= batch:
            return
        first_word = int64(cuda.blockIdx.y) * tile_words + lane
        acc = cuda.local.array(accumulators, float32)
        for i in range(accumulators):
            acc[i] = float32(0.0)
        rows = cuda.local.array(R, int64)
        scales = cuda.local.array(R, float32)
        loaded = cuda.local.array(R, word_type)
        norm = float32(0.0)
        start, end = offsets[b], offsets[b + 1]
        for j in range(start, end, R):
            for u in range(R):
                row = int64(-1)
                scale = float32(0.0)
                if j + u < end:
                    row = int64(values[j + u])
                    scale = weights[j + u] if weighted else float32(1.0)
                    if row < 0 or row >= vocab:
                        cuda.atomic.min(bad_position, 0, j + u)
                        row = int64(-1)
                        scale = float32(0.0)
                    elif pooling == POOLING_SQRTN:
                        norm += scale * scale
                    else:
                        norm += scale
                rows[u] = row
                scales[u] = scale
            for k in range(K):
                c = first_word + k * G
                for u in range(R):
                    loaded[u] = words[rows[u], c] if rows[u] >= 0 and c < n_words else word_type(0)
                for u in range(R):
                    for e in range(E):
                        acc[k * E + e] += scales[u] * read(loaded[u], e)
        if pooling == POOLING_SUM:
            divisor = float32(1.0)
        elif pooling == POOLING_SQRTN:
            divisor = float32(norm ** 0.5)
        else:
            divisor = norm
        for k in range(K):
            c = first_word + k * G
            if c < n_words:
                for e in range(E):
                    value = acc[k * E + e] / divisor if divisor != 0 else float32(0.0)
                    out[b, c * E + e] = write(value)

    gather_bags.bags_per_block = bags_per_block
    BUILT_KERNELS.append((f"gather_bags(fmt={fmt}, word={word_dtype}, lanes={G}, words_per_lane={K}, "
                          f"rows_in_flight={R}, pooling={pooling}, weighted={weighted})", gather_bags))
    return gather_bags
