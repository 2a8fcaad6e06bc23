"""Numba CUDA kernels: gather rows of a (V, D) table by (B, L) ids and average, on the GPU.

The table reaches the kernels as *words*: a (V, W) view of the same bytes in which
one word holds ``E = D / W`` elements: float32 pairs as uint64 (float32 itself
when D is odd), bfloat16 and float16 as uint64 or uint32 bit patterns (a lone
float16 as float16, converted by one hardware instruction; see ``_element_reader``),
measured on an H200: float16 read 2 bytes at a time ran at 46% of copy
bandwidth, bfloat16 in 8-byte words at 71% (benchmarks/RESULTS.md). Wider
words mean fewer, larger loads per gathered row; the backend picks the widest the
row length and the table's alignment allow (``launch.gpu_word_bytes``).

Axis 1 (``gather_mean_sequence``): a group of ``G`` lanes per bag (a warp for wide
rows, a sub-warp for narrow ones), each lane owning ``K`` words of the row. The
group stages its bag's ids in shared memory once (one coalesced read per 32 ids),
then walks them R rows at a time, issuing all of a step's loads before any of
its adds, so several rows are in flight per lane (R = 4, or 8 where a lane loads
8 bytes or less of each row: ``launch.gpu_launch``). Accumulation is float32.

Axis 2 (``gather_mean_embedding``): a group of ``G`` lanes per (bag, position);
each lane sums a strided part of the row, then a shared-memory tree adds the
group's partial sums (no warp shuffles, so the same source runs in the CUDA
simulator).

Bounds: an id outside [0, V) makes the kernel atomically lower ``bad_position[0]``
(at least B*L on entry) to its flat position ``b * L + l``; the host reads that one
value after the launch and raises. Padding ids (``mask_zero``) are never read.

Index arithmetic is 64-bit: block and thread numbers are widened before they are
multiplied, and array indexing is in ``intp``.

Kernels are made per (format, word, lanes, words per lane) by the ``make_*``
factories (memoised), so every shape constant is a compile-time constant and the
per-lane accumulators live in registers.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, int64
from numba.core import config

from ..launch import GPU_BLOCK_THREADS as BLOCK_THREADS  # compiled into the kernels' shared arrays
from ..semantics import FORMAT_BFLOAT16, FORMAT_FLOAT16, FORMAT_FLOAT32

# Device code needs its own answer (which twins to compile); host code asks
# backends.cuda_simulated(), which reads the same setting.
SIMULATED = bool(config.ENABLE_CUDASIM)
# Ids staged in shared memory per bag per step: up to 32 (one coalesced read),
# fewer for narrow groups so a block's stage stays at 8 KiB of int64 ids.
MAX_IDS_PER_STAGE = 32
IDS_PER_LANE_PER_STAGE = 4

# (name with its factory arguments, dispatcher) of every kernel the factories below have
# made in this process: benchmarks/gpu_check.py reports their registers and local memory.
BUILT_KERNELS = []

# --- bit casts and the float16 decode: the one place the simulator needs twins ------------
if SIMULATED:
    def float_from_bits(bits):
        """float32 whose bit pattern is the low 32 bits of ``bits``."""
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

    def bits_from_float(value):
        """The bit pattern of a float32, as an int."""
        return int(np.float32(value).view(np.uint32))

    def float16_bits_to_float(h):
        """float32 value of float16 bits ``h`` (0..0xFFFF)."""
        return np.float32(np.uint16(int(h) & 0xFFFF).view(np.float16))
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline="always")
    def float_from_bits(bits):
        return libdevice.int_as_float(np.int32(bits))  # the cast keeps the low 32 bits

    @cuda.jit(device=True, inline="always")
    def bits_from_float(value):
        return int64(libdevice.float_as_int(value)) & 0xFFFFFFFF

    @cuda.jit(device=True, inline="always")
    def float16_bits_to_float(h):
        # One cvt.f32.f16 instruction. Measured on an H200, an integer decode (shifts,
        # a scale by 2^112, an inf/NaN branch) made float16 no faster than float32
        # (benchmarks/NOTES.md, GPU run 4).
        return libdevice.half2float(np.int16(h))


# --- element formats -------------------------------------------------------------------
@cuda.jit(device=True, inline="always")
def bfloat16_bits_to_float(h):
    """float32 value of bfloat16 bits ``h`` (0..0xFFFF): the high half of a float32."""
    return float_from_bits(h << 16)


@cuda.jit(device=True, inline="always")
def float_to_bfloat16_bits(value):
    """Round to nearest even, as ml_dtypes and TF do; NaN stays a quiet NaN.  -> uint16"""
    bits = bits_from_float(value)
    if value != value:
        return np.uint16((bits >> 16) | 0x40)
    return np.uint16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)


@cuda.jit(device=True, inline="always")
def float_to_float32(value):
    return np.float32(value)


@cuda.jit(device=True, inline="always")
def float_to_float16(value):
    return np.float16(value)


def _element_reader(fmt: int, elements_per_word: int, word_bits: int):
    """Device function (word, e) -> float32 value of element e of a word."""
    if elements_per_word == 1 and fmt != FORMAT_BFLOAT16:
        # float32, or a lone float16 (D odd, or an unaligned table) read as float16:
        # the conversion is one hardware instruction.
        @cuda.jit(device=True, inline="always")
        def read_float(word, e):
            return np.float32(word)
        return read_float
    if fmt == FORMAT_FLOAT32:  # two float32 in a uint64
        @cuda.jit(device=True, inline="always")
        def read_float32_pair(word, e):
            return float_from_bits((word >> np.uint64(32 * e)) & np.uint64(0xFFFFFFFF))
        return read_float32_pair
    if elements_per_word == 1:
        @cuda.jit(device=True, inline="always")
        def read_bfloat16(word, e):
            return bfloat16_bits_to_float(int64(word))
        return read_bfloat16
    word_type = np.uint64 if word_bits == 64 else np.uint32
    if fmt == FORMAT_FLOAT16:
        @cuda.jit(device=True, inline="always")
        def read_packed_float16(word, e):
            unit = np.uint32((word >> word_type(32 * (e // 2))) & word_type(0xFFFFFFFF))
            return float16_bits_to_float((unit >> np.uint32(16 * (e % 2))) & np.uint32(0xFFFF))
        return read_packed_float16

    @cuda.jit(device=True, inline="always")
    def read_packed_bfloat16(word, e):
        # Element e is the high half of a float32 already: shift the even ones up,
        # mask the odd ones in place.
        unit = (word >> word_type(32 * (e // 2))) & word_type(0xFFFFFFFF)
        if e % 2 == 0:
            return float_from_bits(unit << word_type(16))
        return float_from_bits(unit & word_type(0xFFFF0000))
    return read_packed_bfloat16


def _element_writer(fmt: int):
    """Device function float32 -> the output's element (float32, float16, bfloat16 bits)."""
    return {FORMAT_FLOAT32: float_to_float32, FORMAT_FLOAT16: float_to_float16,
            FORMAT_BFLOAT16: float_to_bfloat16_bits}[fmt]


@cuda.jit(device=True, inline="always")
def counted_row(row, vocab, mask_zero, flat_position, bad_position):
    """``row`` if it is to be summed, -1 for padding or a bad id (recorded in bad_position)."""
    if row < 0 or row >= vocab:
        cuda.atomic.min(bad_position, 0, flat_position)
        return int64(-1)
    if mask_zero and row == 0:
        return int64(-1)
    return int64(row)


# --- axis 1 ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def make_gather_mean_sequence(fmt: int, word_dtype: str, lanes: int, words_per_lane: int,
                              rows_in_flight: int):
    """The axis-1 kernel for one (format, word dtype, lanes per bag, words per lane, rows in flight).

    Launch: grid (ceil(B / bags_per_block), column tiles), block BLOCK_THREADS.
    Each block's group g handles bag blockIdx.x * bags_per_block + g and words
    [blockIdx.y * lanes * words_per_lane, ...) of its row, loading rows_in_flight
    rows before summing any (launch.gpu_launch).
    """
    word = np.dtype(word_dtype)
    elements = word.itemsize // (4 if fmt == FORMAT_FLOAT32 else 2)
    read = _element_reader(fmt, elements, word.itemsize * 8)
    write = _element_writer(fmt)
    word_type = word.type  # called in device code: a float16 constant captured here is invalid NVVM IR
    G, K, E, R = lanes, words_per_lane, elements, rows_in_flight
    bags_per_block = BLOCK_THREADS // G
    tile_words = G * K
    accumulators = K * E
    ids_per_stage = min(MAX_IDS_PER_STAGE, IDS_PER_LANE_PER_STAGE * G)

    @cuda.jit(device=True, inline="always")
    def load(words, row, c, n_words):
        # An uncounted row loads nothing: its zero word adds +0.0 in every format.
        if row >= 0 and c < n_words:
            return words[row, c]
        return word_type(0)

    @cuda.jit(device=True, inline="always")
    def add(acc, k, w):
        for e in range(E):
            acc[k * E + e] += read(w, e)

    @cuda.jit
    def gather_mean_sequence(words, ids, mask_zero, out, bad_position):
        """out[b, d] = mean of table[ids[b, l], d] over the counted l.

        words [V][W] (the table as words); ids [B][L] int32/int64; out [B][D]
        float32, float16 or uint16 bfloat16 bits; bad_position [1] int64, >= B*L on entry.
        """
        batch, length = ids.shape
        vocab, n_words = words.shape
        lane = cuda.threadIdx.x % G
        slot = cuda.threadIdx.x // G
        b = int64(cuda.blockIdx.x) * bags_per_block + slot
        first_word = int64(cuda.blockIdx.y) * tile_words + lane
        in_batch = b < batch
        staged = cuda.shared.array((bags_per_block, ids_per_stage), int64)
        acc = cuda.local.array(accumulators, float32)
        for i in range(accumulators):
            acc[i] = float32(0.0)
        rows = cuda.local.array(R, int64)
        loaded = cuda.local.array(R, word_type)
        count = int64(0)
        for start in range(0, length, ids_per_stage):
            n = min(ids_per_stage, length - start)
            if in_batch:
                for j in range(lane, n, G):
                    staged[slot, j] = ids[b, start + j]
            cuda.syncthreads()
            if in_batch:
                base = b * length + start
                for j in range(0, n, R):
                    # Constant trip counts: unrolled, so rows[] and loaded[] live in registers.
                    for u in range(R):
                        row = int64(-1)
                        if j + u < n:
                            row = counted_row(staged[slot, j + u], vocab, mask_zero, base + j + u,
                                              bad_position)
                        rows[u] = row
                        count += int64(row >= 0)
                    for k in range(K):
                        c = first_word + k * G
                        for u in range(R):
                            loaded[u] = load(words, rows[u], c, n_words)
                        for u in range(R):
                            add(acc, k, loaded[u])
            cuda.syncthreads()
        if in_batch:
            for k in range(K):
                c = first_word + k * G
                if c < n_words:
                    for e in range(E):
                        mean = acc[k * E + e] / float32(count) if count else float32(0.0)
                        out[b, c * E + e] = write(mean)

    gather_mean_sequence.bags_per_block = bags_per_block
    gather_mean_sequence.tile_words = tile_words
    BUILT_KERNELS.append((f"gather_mean_sequence(fmt={fmt}, word={word_dtype}, lanes={G}, "
                          f"words_per_lane={K}, rows_in_flight={R})", gather_mean_sequence))
    return gather_mean_sequence


# --- axis 2 ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def make_gather_mean_embedding(fmt: int, word_dtype: str, lanes: int):
    """The axis-2 kernel for one (format, word dtype, lanes per position).

    Launch: grid ceil(B * L / positions_per_block), block BLOCK_THREADS; group g
    of a block handles flat position blockIdx.x * positions_per_block + g.
    """
    word = np.dtype(word_dtype)
    elements = word.itemsize // (4 if fmt == FORMAT_FLOAT32 else 2)
    read = _element_reader(fmt, elements, word.itemsize * 8)
    write = _element_writer(fmt)
    G, E = lanes, elements
    positions_per_block = BLOCK_THREADS // G

    @cuda.jit(device=True, inline="always")
    def word_sum(w):
        total = float32(0.0)
        for e in range(E):
            total += read(w, e)
        return total

    @cuda.jit
    def gather_mean_embedding(words, ids, mask_zero, out, bad_position):
        """out[b, l] = mean over d of table[ids[b, l], d]; padding gives 0.

        words [V][W]; ids [B][L] int32/int64; out [B][L] float32, float16 or
        uint16 bfloat16 bits; bad_position [1] int64, >= B*L on entry.
        """
        batch, length = ids.shape
        vocab, n_words = words.shape
        tid = cuda.threadIdx.x
        lane = tid % G
        position = int64(cuda.blockIdx.x) * positions_per_block + tid // G
        in_range = position < batch * length
        partial = cuda.shared.array(BLOCK_THREADS, float32)
        total = float32(0.0)
        row = int64(-1)
        b = l = int64(0)
        if in_range:
            b = position // length
            l = position - b * length
            row = counted_row(ids[b, l], vocab, mask_zero, position, bad_position)
            if row >= 0:
                # Four words in flight per lane, then the tail.
                c = int64(lane)
                while c + 3 * G < n_words:
                    w0 = words[row, c]
                    w1 = words[row, c + G]
                    w2 = words[row, c + 2 * G]
                    w3 = words[row, c + 3 * G]
                    total += (word_sum(w0) + word_sum(w1)) + (word_sum(w2) + word_sum(w3))
                    c += 4 * G
                while c < n_words:
                    total += word_sum(words[row, c])
                    c += G
        partial[tid] = total
        cuda.syncthreads()
        step = G // 2
        while step > 0:
            if lane < step:
                partial[tid] += partial[tid + step]
            cuda.syncthreads()
            step //= 2
        if in_range and lane == 0:
            if row >= 0:
                out[b, l] = write(partial[tid] / float32(n_words * E))
            else:
                out[b, l] = write(float32(0.0))

    gather_mean_embedding.positions_per_block = positions_per_block
    BUILT_KERNELS.append((f"gather_mean_embedding(fmt={fmt}, word={word_dtype}, lanes={G})",
                          gather_mean_embedding))
    return gather_mean_embedding
