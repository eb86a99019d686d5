// Rotary position embedding, both pair layouts:   for token t at position m = positions[t] and pair i,
//
//     y_a = x_a cos(m theta_i) - x_b sin(m theta_i)
//     y_b = x_a sin(m theta_i) + x_b cos(m theta_i)
//
// where the pair (a, b) of a d_R-dim vector is
//     interleaved (MLA's q^R, k^R):       (2i, 2i + 1)
//     half        (the lightning indexer): (i,  i + d_R/2)
//
// Checked against dsa_tutorial.rope.apply_rope (float64). Loader: dsa_tutorial.rope.apply_rope_cuda
// (table APPLY_ROPE_KERNELS).
//
//   kernel 1  apply_rope_{interleaved,half}_{f32,bf16}       one thread per pair, any even d_R
//   kernel 2  apply_rope_{interleaved,half}_vec_{f32,bf16}   one thread per 16-byte chunk of x (4 float32
//             or 8 bfloat16 values: 2 or 4 interleaved pairs; for the half layout a chunk of each
//             half, 4 or 8 pairs), ROPE_UNROLL chunks per thread loaded before any is rotated, the
//             cos / sin entries of those pairs read as one vector too. Needs d_R (interleaved) or
//             d_R / 2 (half) a multiple of the chunk, 16-byte aligned x, y and fewer than 2^31
//             chunks (the loader checks).
//   x, y float32 or bfloat16 [T, H, d_R], arithmetic in float32. Both: ROPE_THREADS threads per block;
//   kernel 1 a grid of at most ROPE_PAIRS_MAX_BLOCKS blocks (a grid-stride loop covers the rest),
//   kernel 2 ceil(chunks / (ROPE_THREADS * ROPE_UNROLL)) blocks.
//
// Kernel 1: one thread per pair, a grid-stride loop over the T * H * d_R/2 pairs. Each thread moves
// 8 (float32) or 4 (bf16) bytes and spends more instructions on 64-bit index arithmetic than on the
// rotation: it reaches about half the copy bandwidth on an H200. Kernel 2 moves 16 bytes per load,
// keeps two loads in flight per thread and needs one 32-bit division per chunk.
//
// Both: cos and sin are read from a float32 table [max_seq_len, d_R/2] built in float64 on the host
// (dsa_tutorial.rope.cos_sin_table): m theta_i reaches 1.6e5 rad at V3.2's context, and forming it in
// float32 here would be off by several 1e-3 rad.
// A position outside the table (m < 0 or m >= max_seq_len) writes NaN for that token and reads
// nothing: memory-safe for any positions (the loader checks their range only when the package's
// data checks are on).
// Memory-bound: each pair reads 2 values, 2 table entries (cached: H heads share them) and writes 2.
#include <cuda_bf16.h>

#include "common.cuh"  // to_float, from_float, unpack16, pack16, load_floats

#define ROPE_THREADS 256                   // threads per block, both kernels
#define ROPE_UNROLL 2                      // kernel 2: 16-byte chunks per thread, all loaded before any is rotated
#define ROPE_PAIRS_MAX_BLOCKS (65535 * 8)  // kernel 1: the most blocks launched; a grid-stride loop does the rest

// An extern "C" entry point running BODY (rope_pairs: kernel 1, rope_chunks: kernel 2) for storage type T, one layout.
#define ROPE_ENTRY(NAME, BODY, T, INTERLEAVED)                                                               \
    extern "C" __global__ void __launch_bounds__(ROPE_THREADS)                                               \
    NAME(const T* x, const long long* positions, const float* cos_table, const float* sin_table, T* y,       \
         int n_tokens, int n_heads, int d_rope, int max_seq_len) {                                           \
        BODY<T, INTERLEAVED>(x, positions, cos_table, sin_table, y, n_tokens, n_heads, d_rope, max_seq_len); \
    }

// INTERLEAVED = true: pair i is (2i, 2i+1); false: (i, i + d_R/2).
template <typename T, bool INTERLEAVED>
__device__ void rope_pairs(const T* __restrict__ x, const long long* __restrict__ positions,
                           const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                           T* __restrict__ y, int n_tokens, int n_heads, int d_rope, int max_seq_len) {
    const int n_half = d_rope / 2;
    const long long n_pairs = (long long)n_tokens * n_heads * n_half;
    for (long long pair = blockIdx.x * (long long)blockDim.x + threadIdx.x; pair < n_pairs;
         pair += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(pair % n_half);              // pair index within the head
        const long long row = pair / n_half;             // t * H + head
        const int t = (int)(row / n_heads);
        const long long base = row * d_rope;
        const int a = INTERLEAVED ? 2 * i : i;           // first coordinate of the pair
        const int b = INTERLEAVED ? 2 * i + 1 : i + n_half;
        const long long m = positions[t];
        if (m < 0 || m >= max_seq_len) {                  // never read outside the table
            y[base + a] = from_float<T>(__int_as_float(0x7fc00000));
            y[base + b] = from_float<T>(__int_as_float(0x7fc00000));
            continue;
        }
        const float cos_mi = cos_table[m * n_half + i];  // cos(m theta_i)
        const float sin_mi = sin_table[m * n_half + i];  // sin(m theta_i)
        const float x_a = to_float(x[base + a]), x_b = to_float(x[base + b]);
        // y_a = x_a cos - x_b sin,  y_b = x_a sin + x_b cos
        y[base + a] = from_float<T>(x_a * cos_mi - x_b * sin_mi);
        y[base + b] = from_float<T>(x_a * sin_mi + x_b * cos_mi);
    }
}

ROPE_ENTRY(apply_rope_interleaved_f32, rope_pairs, float, true)
ROPE_ENTRY(apply_rope_half_f32, rope_pairs, float, false)
ROPE_ENTRY(apply_rope_interleaved_bf16, rope_pairs, __nv_bfloat16, true)
ROPE_ENTRY(apply_rope_half_bf16, rope_pairs, __nv_bfloat16, false)

// ------------------------------------------------------------------------------------ kernel 2
// 16 bytes of T (x, y are 16-byte aligned: checked by the loader), kept raw until the arithmetic
// (unpack16 / pack16, in cuda/common.cuh, turn them into floats and back)
template <typename T> struct Chunk {
    static constexpr int N = 16 / sizeof(T);  // values per chunk: 4 float32, 8 bfloat16
    uint4 raw;
    __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const uint4*>(p); }
    __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = raw; }
    __device__ __forceinline__ void unpack(float (&v)[N]) const { unpack16(raw, v); }
    __device__ __forceinline__ void pack(const float (&v)[N]) { raw = pack16(v); }
};

// Chunk `idx` of the [T * H rows][chunks_per_row] grid:
//   interleaved: values c N .. c N + N-1 of the row = pairs i0 .. i0 + N/2 - 1, i0 = c N / 2
//   half:        values c N .. (first half) and d_R/2 + c N .. (second half) = pairs c N .. c N + N-1
template <typename T, bool INTERLEAVED>
__device__ void rope_chunks(const T* __restrict__ x, const long long* __restrict__ positions,
                            const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                            T* __restrict__ y, int n_tokens, int n_heads, int d_rope, int max_seq_len) {
    constexpr int N = Chunk<T>::N;
    constexpr int PAIRS = INTERLEAVED ? N / 2 : N;  // pairs per chunk
    const int n_half = d_rope / 2;
    const unsigned chunks_per_row = INTERLEAVED ? d_rope / N : n_half / N;
    const unsigned n_chunks = (unsigned)n_tokens * n_heads * chunks_per_row;  // < 2^31: checked by the loader
    const unsigned first = blockIdx.x * (blockDim.x * ROPE_UNROLL) + threadIdx.x;
    Chunk<T> x_a[ROPE_UNROLL], x_b[ROPE_UNROLL];  // x_b: the second half's chunk (half layout only)
    float cos_mi[ROPE_UNROLL][PAIRS], sin_mi[ROPE_UNROLL][PAIRS];
    bool inside[ROPE_UNROLL];
    long long offset[ROPE_UNROLL];  // of the chunk's first value in x and y
    // every load first (consecutive threads: consecutive chunks, coalesced), then the arithmetic
#pragma unroll
    for (int u = 0; u < ROPE_UNROLL; ++u) {
        const unsigned idx = first + u * blockDim.x;
        if (idx >= n_chunks) continue;
        const unsigned row = idx / chunks_per_row, c = idx - row * chunks_per_row;  // row = t * H + head
        const int t = row / n_heads;
        offset[u] = (long long)row * d_rope + c * N;
        x_a[u].load(x + offset[u]);
        if (!INTERLEAVED) x_b[u].load(x + offset[u] + n_half);
        const long long m = positions[t];
        inside[u] = m >= 0 && m < max_seq_len;  // never read outside the table
        if (inside[u]) {
            load_floats<PAIRS>(cos_table + m * n_half + c * PAIRS, cos_mi[u]);  // cos(m theta_i), i = i0 ..
            load_floats<PAIRS>(sin_table + m * n_half + c * PAIRS, sin_mi[u]);
        } else {
#pragma unroll
            for (int p = 0; p < PAIRS; ++p) cos_mi[u][p] = sin_mi[u][p] = 0.f;  // unused: the output is NaN
        }
    }
#pragma unroll
    for (int u = 0; u < ROPE_UNROLL; ++u) {
        const unsigned idx = first + u * blockDim.x;
        if (idx >= n_chunks) continue;
        float v_a[N], v_b[N];
        x_a[u].unpack(v_a);
        if (!INTERLEAVED) x_b[u].unpack(v_b);
#pragma unroll
        for (int p = 0; p < PAIRS; ++p) {
            // the pair (a, b): (v_a[2p], v_a[2p+1]) of one chunk, or (v_a[p], v_b[p]) of the two halves
            float& a = INTERLEAVED ? v_a[2 * p] : v_a[p];
            float& b = INTERLEAVED ? v_a[2 * p + 1] : v_b[p];
            const float x_a_p = a, x_b_p = b;
            // y_a = x_a cos - x_b sin,  y_b = x_a sin + x_b cos  (NaN for a position outside the table)
            a = inside[u] ? x_a_p * cos_mi[u][p] - x_b_p * sin_mi[u][p] : __int_as_float(0x7fc00000);
            b = inside[u] ? x_a_p * sin_mi[u][p] + x_b_p * cos_mi[u][p] : __int_as_float(0x7fc00000);
        }
        x_a[u].pack(v_a);
        x_a[u].store(y + offset[u]);
        if (!INTERLEAVED) {
            x_b[u].pack(v_b);
            x_b[u].store(y + offset[u] + n_half);
        }
    }
}

ROPE_ENTRY(apply_rope_interleaved_vec_f32, rope_chunks, float, true)
ROPE_ENTRY(apply_rope_half_vec_f32, rope_chunks, float, false)
ROPE_ENTRY(apply_rope_interleaved_vec_bf16, rope_chunks, __nv_bfloat16, true)
ROPE_ENTRY(apply_rope_half_vec_bf16, rope_chunks, __nv_bfloat16, false)
