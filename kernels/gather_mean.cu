// CUDA C kernels for the "cupy" backend: gather rows of a (V, D) table by (B, L) ids and
// average, without the (B, L, D) intermediate. Compiled by CuPy's RawModule (NVRTC) with
// name expressions such as "gather_mean_sequence<0, 16, 32, 1, int>"; no headers needed.
//
// The table is read as words of WB bytes (16: uint4, 8: uint2, 4: unsigned, 2: unsigned
// short), each holding E = WB / item elements; the host picks the widest word that divides
// the row's bytes and the table's address (fused_embedding.launch.gpu_word_bytes).
//
// FMT: 0 float32, 1 float16, 2 bfloat16 (fused_embedding.semantics.TABLE_FORMATS).
// Accumulation is float32; the output has the table's format.
//
// Axis 1 (gather_mean_sequence): a group of G lanes (G | 32) per bag, each lane owning K words
// of the row (a column tile of G * K words per blockIdx.y). Each lane loads and checks one id
// of the next G (several when G < 4); the group broadcasts them with __shfl_sync, so ids are
// read once per bag, then issues the loads of four rows before summing any of them.
// Axis 2 (gather_mean_embedding): a group of G lanes per (bag, position) sums the row in
// strided words, four in flight, then reduces across the group with __shfl_xor_sync.
//
// Bounds: an id outside [0, V) lowers *bad_position (at least B * L on entry) to its flat position
// b * L + l with atomicMin; the host reads it after the launch and raises. Padding ids
// (mask_zero) are never read. All index arithmetic is 64-bit.

typedef unsigned long long u64;
typedef long long i64;

// Every lane of every warp reaches each shuffle (blocks are whole warps, trip counts are
// the same for all lanes, no lane returns early), so the shuffles name the whole warp;
// width G keeps each group's lanes to themselves.
#define FULL_WARP 0xffffffffu

template <int WB> struct Word;
template <> struct Word<16> {
    typedef uint4 T;
    static __device__ __forceinline__ unsigned unit(const T& w, int i) {
        return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
    }
};
template <> struct Word<8> {
    typedef uint2 T;
    static __device__ __forceinline__ unsigned unit(const T& w, int i) { return i == 0 ? w.x : w.y; }
};
template <> struct Word<4> {
    typedef unsigned T;
    static __device__ __forceinline__ unsigned unit(const T& w, int) { return w; }
};
template <> struct Word<2> {
    typedef unsigned short T;
    static __device__ __forceinline__ unsigned unit(const T& w, int) { return w; }
};

// FUSED_EMBEDDING_HOST_EMULATION: tests/test_cuda_sources.py also compiles this file as host
// C++ (one thread per CUDA thread, shuffles through a barrier) to run the kernels without a
// GPU; only the two float16 conversions, inline PTX here, need a host twin there.
__device__ __forceinline__ float half_bits_to_float(unsigned bits) {
#ifdef FUSED_EMBEDDING_HOST_EMULATION
    return host_half_bits_to_float(bits);
#else
    float value;
    unsigned short h = (unsigned short)bits;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(h));
    return value;
#endif
}

__device__ __forceinline__ unsigned short float_to_half_bits(float value) {
#ifdef FUSED_EMBEDDING_HOST_EMULATION
    return host_float_to_half_bits(value);
#else
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(value));
    return h;
#endif
}

// Round to nearest even, as ml_dtypes and TF do; NaN stays a quiet NaN.
__device__ __forceinline__ unsigned short float_to_bfloat16_bits(float value) {
    unsigned bits = __float_as_uint(value);
    if (value != value) return (unsigned short)((bits >> 16) | 0x40u);
    return (unsigned short)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

template <int FMT, int WB> struct Format {
    static constexpr int ITEM = FMT == 0 ? 4 : 2;
    static constexpr int E = WB / ITEM;  // elements per word
    typedef typename Word<WB>::T W;
    static __device__ __forceinline__ float element(const W& w, int e) {
        if (FMT == 0) return __uint_as_float(Word<WB>::unit(w, e));
        unsigned half = (Word<WB>::unit(w, e / 2) >> (16 * (e % 2))) & 0xffffu;
        return FMT == 1 ? half_bits_to_float(half) : __uint_as_float(half << 16);
    }
    static __device__ __forceinline__ void store(void* out, i64 index, float value) {
        if (FMT == 0) static_cast<float*>(out)[index] = value;
        else if (FMT == 1) static_cast<unsigned short*>(out)[index] = float_to_half_bits(value);
        else static_cast<unsigned short*>(out)[index] = float_to_bfloat16_bits(value);
    }
};

// All-zero bits: +0.0 in every format, so an uncounted row adds nothing.
template <int WB> __device__ __forceinline__ typename Word<WB>::T zero_word() {
    return typename Word<WB>::T();
}

// The row to sum for an id, or -1 for padding and bad ids (recorded in bad_position).
__device__ __forceinline__ i64 counted_row(i64 row, i64 vocab, int mask_zero, i64 flat_position,
                                           i64* bad_position) {
    if (row < 0 || row >= vocab) {
        atomicMin(bad_position, flat_position);
        return -1;
    }
    return (mask_zero && row == 0) ? -1 : row;
}

// table [V][W] words, ids [B][L] (IdT), out [B][D] (the table's format), bad_position [1].
// grid (ceil(B / (blockDim.x / G)), ceil(W / (G * K))), block blockDim.x (a multiple of 32).
// R rows are loaded before any is summed (launch.gpu_launch: 4, or 8 for narrow lanes).
template <int FMT, int WB, int G, int K, int R, typename IdT>
__global__ void gather_mean_sequence(const void* __restrict__ table, const void* __restrict__ ids_raw,
                                     i64 batch, i64 length, i64 vocab, i64 n_words, int mask_zero,
                                     void* __restrict__ out, i64* bad_position) {
    typedef Format<FMT, WB> F;
    typedef typename F::W W;
    const W* __restrict__ words = static_cast<const W*>(table);
    const IdT* __restrict__ ids = static_cast<const IdT*>(ids_raw);
    const int lane = threadIdx.x % G;
    const i64 b = (i64)blockIdx.x * (blockDim.x / G) + threadIdx.x / G;
    const i64 first_word = (i64)blockIdx.y * (G * K) + lane;
    const bool in_batch = b < batch;

    float acc[K][F::E];
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
        for (int e = 0; e < F::E; ++e) acc[k][e] = 0.f;
    int count = 0;

    // Ids per stage: one per lane, or R (Q per lane) when the group is narrower,
    // so a step always has R rows to load. Every lane of a warp runs the same trip counts
    // (L is shared by all bags), so the shuffles below always see their whole group.
    constexpr int STAGE = G > R ? G : R;
    constexpr int Q = STAGE / G;
    for (i64 start = 0; start < length; start += STAGE) {
        const int n = (int)(length - start < STAGE ? length - start : STAGE);
        i64 my_rows[Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            const int j = q * G + lane;
            my_rows[q] = -1;
            if (in_batch && j < n) {
                const i64 position = b * length + start + j;
                my_rows[q] = counted_row((i64)ids[position], vocab, mask_zero, position, bad_position);
            }
        }
#pragma unroll
        for (int j = 0; j < STAGE; j += R) {
            if (j >= n) break;  // the same for the whole warp
            i64 rows[R];
#pragma unroll
            for (int u = 0; u < R; ++u) {
                const i64 r = __shfl_sync(FULL_WARP, my_rows[(j + u) / G], (j + u) % G, G);
                rows[u] = (j + u < n) ? r : -1;
                count += rows[u] >= 0;
            }
            W w[R][K];
#pragma unroll
            for (int u = 0; u < R; ++u)
#pragma unroll
                for (int k = 0; k < K; ++k) {
                    const i64 c = first_word + (i64)k * G;
                    w[u][k] = (rows[u] >= 0 && c < n_words) ? words[rows[u] * n_words + c] : zero_word<WB>();
                }
#pragma unroll
            for (int u = 0; u < R; ++u)
#pragma unroll
                for (int k = 0; k < K; ++k)
#pragma unroll
                    for (int e = 0; e < F::E; ++e) acc[k][e] += F::element(w[u][k], e);
        }
    }
    if (!in_batch) return;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const i64 c = first_word + (i64)k * G;
        if (c < n_words) {
#pragma unroll
            for (int e = 0; e < F::E; ++e)
                F::store(out, b * (n_words * F::E) + c * F::E + e,
                         count ? acc[k][e] / (float)count : 0.f);
        }
    }
}

// table [V][W] words, ids [B][L] (IdT), out [B][L] (the table's format), bad_position [1].
// grid ceil(B * L / (blockDim.x / G)), block blockDim.x (a multiple of 32).
template <int FMT, int WB, int G, typename IdT>
__global__ void gather_mean_embedding(const void* __restrict__ table, const void* __restrict__ ids_raw,
                                      i64 batch, i64 length, i64 vocab, i64 n_words, int mask_zero,
                                      void* __restrict__ out, i64* bad_position) {
    typedef Format<FMT, WB> F;
    typedef typename F::W W;
    const W* __restrict__ words = static_cast<const W*>(table);
    const IdT* __restrict__ ids = static_cast<const IdT*>(ids_raw);
    const int lane = threadIdx.x % G;
    const i64 position = (i64)blockIdx.x * (blockDim.x / G) + threadIdx.x / G;
    const bool in_range = position < batch * length;

    float total = 0.f;
    i64 row = -1;
    if (in_range) {
        // One lane checks the id (and records a bad one); the group shares the result.
        if (lane == 0) row = counted_row((i64)ids[position], vocab, mask_zero, position, bad_position);
    }
    row = __shfl_sync(FULL_WARP, row, 0, G);
    if (row >= 0) {
        const W* __restrict__ row_words = words + row * n_words;
        i64 c = lane;
        for (; c + 3 * G < n_words; c += 4 * G) {
            const W w0 = row_words[c], w1 = row_words[c + G], w2 = row_words[c + 2 * G],
                    w3 = row_words[c + 3 * G];
#pragma unroll
            for (int e = 0; e < F::E; ++e)
                total += (F::element(w0, e) + F::element(w1, e)) + (F::element(w2, e) + F::element(w3, e));
        }
        for (; c < n_words; c += G) {
            const W w = row_words[c];
#pragma unroll
            for (int e = 0; e < F::E; ++e) total += F::element(w, e);
        }
    }
#pragma unroll
    for (int step = G / 2; step > 0; step /= 2) total += __shfl_xor_sync(FULL_WARP, total, step, G);
    if (in_range && lane == 0)
        F::store(out, position, row >= 0 ? total / (float)(n_words * F::E) : 0.f);
}

// CSR bags (gather_bags): bag b is values[offsets[b] .. offsets[b + 1]), each id's row scaled
// by its weight (1 when unweighted) and the bag's sum divided by POOL's normaliser:
// 0 mean (the weights' sum), 1 sum (1), 2 sqrtn (sqrt of the squared weights' sum); a zero
// normaliser gives zeros, as TF's div_no_nan (an empty bag too). The layout of
// gather_mean_sequence (a group of G lanes per bag, K words per lane, R rows in flight), but
// every lane reads the bag's ids itself: bags differ in length, so no shuffle could span a
// warp. A bad id lowers *bad_position (at least N on entry) to its position in values.
// table [V][W] words, values [N] (IdT), offsets [B + 1], weights [N] (read when WEIGHTED),
// out [B][D] (the table's format). grid (ceil(B / (blockDim.x / G)), ceil(W / (G * K))).
template <int FMT, int WB, int G, int K, int R, int POOL, int WEIGHTED, typename IdT>
__global__ void gather_bags(const void* __restrict__ table, const void* __restrict__ values_raw,
                            const i64* __restrict__ offsets, const float* __restrict__ weights,
                            i64 batch, i64 vocab, i64 n_words, void* __restrict__ out, i64* bad_position) {
    typedef Format<FMT, WB> F;
    typedef typename F::W W;
    const W* __restrict__ words = static_cast<const W*>(table);
    const IdT* __restrict__ values = static_cast<const IdT*>(values_raw);
    const int lane = threadIdx.x % G;
    const i64 b = (i64)blockIdx.x * (blockDim.x / G) + threadIdx.x / G;
    if (b >= batch) return;  // no shuffles below: a lane may leave
    const i64 first_word = (i64)blockIdx.y * (G * K) + lane;

    float acc[K][F::E];
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
        for (int e = 0; e < F::E; ++e) acc[k][e] = 0.f;
    float norm = 0.f;
    const i64 end = offsets[b + 1];
    for (i64 j = offsets[b]; j < end; j += R) {
        i64 rows[R];
        float scale[R];
#pragma unroll
        for (int u = 0; u < R; ++u) {
            rows[u] = -1;
            scale[u] = 0.f;
            if (j + u < end) {
                const i64 row = (i64)values[j + u];
                if (row < 0 || row >= vocab) {
                    atomicMin(bad_position, j + u);
                } else {
                    rows[u] = row;
                    scale[u] = WEIGHTED ? weights[j + u] : 1.f;
                    norm += POOL == 2 ? scale[u] * scale[u] : scale[u];
                }
            }
        }
        W w[R][K];
#pragma unroll
        for (int u = 0; u < R; ++u)
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const i64 c = first_word + (i64)k * G;
                w[u][k] = (rows[u] >= 0 && c < n_words) ? words[rows[u] * n_words + c] : zero_word<WB>();
            }
#pragma unroll
        for (int u = 0; u < R; ++u)
#pragma unroll
            for (int k = 0; k < K; ++k)
#pragma unroll
                for (int e = 0; e < F::E; ++e) acc[k][e] += scale[u] * F::element(w[u][k], e);
    }
    const float divisor = POOL == 1 ? 1.f : POOL == 2 ? sqrtf(norm) : norm;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const i64 c = first_word + (i64)k * G;
        if (c < n_words) {
#pragma unroll
            for (int e = 0; e < F::E; ++e)
                F::store(out, b * (n_words * F::E) + c * F::E + e, divisor != 0.f ? acc[k][e] / divisor : 0.f);
        }
    }
}
