// Rotary position embedding, both pair layouts:   for token t at position m = positions[t] and pair i,
//
//     y_a = x_a cos(m theta_i) - x_b sin(m theta_i)
//     y_b = x_a sin(m theta_i) + x_b cos(m theta_i)
//
// where the pair (a, b) of a d_R-dim vector is
//     interleaved (MLA's q^R, k^R):       (2i, 2i + 1)
//     half        (the lightning indexer): (i,  i + d_R/2)
//
// Checked against dsa_tutorial.rope.apply_rope (float64). Loader: dsa_tutorial.rope.rope_cuda.
//
//   rope_interleaved_f32 / rope_half_f32    x, y float32  [T, H, d_R]
//   rope_interleaved_bf16 / rope_half_bf16  x, y bfloat16 [T, H, d_R], arithmetic in float32
//
// One thread per pair, a grid-stride loop over the T * H * d_R/2 pairs. cos and sin are read from
// a float32 table [max_seq_len, d_R/2] built in float64 on the host (dsa_tutorial.rope.cos_sin_table):
// m theta_i reaches 1.6e5 rad at V3.2's context, and forming it in float32 here would be off by
// several 1e-3 rad.
// A position outside the table writes NaN (the loader rejects such positions before launching).
// Memory-bound: each pair reads 2 values, 2 table entries (cached: H heads share them) and writes 2.
#include <cuda_bf16.h>

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

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

#define ROPE_KERNEL(NAME, T, INTERLEAVED)                                                               \
    extern "C" __global__ void NAME(const T* x, const long long* positions, const float* cos_table,     \
                                    const float* sin_table, T* y, int n_tokens, int n_heads, int d_rope, \
                                    int max_seq_len) {                                                  \
        rope_pairs<T, INTERLEAVED>(x, positions, cos_table, sin_table, y, n_tokens, n_heads, d_rope,    \
                                   max_seq_len);                                                        \
    }

ROPE_KERNEL(rope_interleaved_f32, float, true)
ROPE_KERNEL(rope_half_f32, float, false)
ROPE_KERNEL(rope_interleaved_bf16, __nv_bfloat16, true)
ROPE_KERNEL(rope_half_bf16, __nv_bfloat16, false)
