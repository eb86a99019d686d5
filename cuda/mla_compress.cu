// MLA compression, formula (1), from the output of the down-projection to the latent cache entry.
//
// The down-projection [c ; k_pe] = wkv_a h_t = [W^DKV h_t ; W^KR h_t] is a GEMM (left to cuBLAS);
// what follows it is memory-bound and is fused here, one read of the GEMM output, one write of the
// cache entry of d_c + d_R values (576 for V3.2):
//
//     c^KV_t = c / sqrt(mean_j(c_j^2) + eps) * kv_norm_weight          (kv_norm, formula 1)
//     k^R_t  = k_pe                  (mla_compress_*)        or
//     k^R_t  = RoPE(k_pe, m_t)       (mla_compress_rope_*, formula 3, interleaved pairs (2i, 2i+1))
//     latent[t] = [c^KV_t | k^R_t]
//
//   mla_compress_f32 / mla_compress_rope_f32     kv, latent float32  [T, d_c + d_R]
//   mla_compress_bf16 / mla_compress_rope_bf16   kv, latent bfloat16 [T, d_c + d_R], float32 arithmetic
//   (kv_norm_weight float32 [d_c]; RoPE tables float32 [max_seq_len, d_R/2], see cuda/rope.cu)
//
// One warp per token, COMPRESS_WARPS tokens per block. The lanes stride over the row (coalesced:
// 32 consecutive values per step); the sum of squares is combined with a warp shuffle tree, so the
// kernel has no shared memory and no __syncthreads: a warp whose token is past T just returns.
// Second pass re-reads the row (from L1, it was just loaded) to scale it. Checked against
// dsa_tutorial.mla.kv_compress (+ rope.apply_rope); loader dsa_tutorial.mla.kv_compress_cuda.
#include <cuda_bf16.h>

#define COMPRESS_WARPS 8

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float value) {
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;  // every lane holds the total
}

template <typename T, bool ROPE>
__device__ void compress_row(const T* __restrict__ kv, const float* __restrict__ kv_norm_weight,
                             T* __restrict__ latent, int n_tokens, int d_c, int d_rope, float eps,
                             const long long* __restrict__ positions, const float* __restrict__ cos_table,
                             const float* __restrict__ sin_table, int max_seq_len) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long t = (long long)blockIdx.x * COMPRESS_WARPS + warp;
    if (t >= n_tokens) return;  // the whole warp leaves: no barrier follows
    const int width = d_c + d_rope;
    const T* kv_row = kv + t * width;   // [c (d_c) | k_pe (d_R)]
    T* latent_row = latent + t * width; // [c^KV (d_c) | k^R (d_R)]

    // mean_j(c_j^2): lane partial sums, then the warp tree
    float sum_sq = 0.f;
    for (int j = lane; j < d_c; j += 32) {
        const float c_j = to_float(kv_row[j]);
        sum_sq += c_j * c_j;
    }
    const float inv_rms = rsqrtf(warp_sum(sum_sq) / d_c + eps);
    // c^KV_j = c_j * inv_rms * kv_norm_weight_j
    for (int j = lane; j < d_c; j += 32)
        latent_row[j] = from_float<T>(to_float(kv_row[j]) * inv_rms * kv_norm_weight[j]);

    const T* k_pe = kv_row + d_c;
    T* k_rope = latent_row + d_c;
    if (!ROPE) {
        for (int j = lane; j < d_rope; j += 32) k_rope[j] = k_pe[j];
        return;
    }
    const long long m = positions[t];
    const int n_half = d_rope / 2;
    for (int i = lane; i < n_half; i += 32) {
        if (m < 0 || m >= max_seq_len) {  // never read outside the table (the loader rejects these)
            k_rope[2 * i] = k_rope[2 * i + 1] = from_float<T>(__int_as_float(0x7fc00000));
            continue;
        }
        const float cos_mi = cos_table[m * n_half + i], sin_mi = sin_table[m * n_half + i];
        const float x_a = to_float(k_pe[2 * i]), x_b = to_float(k_pe[2 * i + 1]);
        // k^R_2i = x_2i cos - x_2i+1 sin,  k^R_2i+1 = x_2i sin + x_2i+1 cos
        k_rope[2 * i] = from_float<T>(x_a * cos_mi - x_b * sin_mi);
        k_rope[2 * i + 1] = from_float<T>(x_a * sin_mi + x_b * cos_mi);
    }
}

#define COMPRESS_KERNELS(SUFFIX, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * COMPRESS_WARPS)                                        \
    mla_compress_##SUFFIX(const T* kv, const float* kv_norm_weight, T* latent, int n_tokens, int d_c,         \
                          int d_rope, float eps) {                                                           \
        compress_row<T, false>(kv, kv_norm_weight, latent, n_tokens, d_c, d_rope, eps, nullptr, nullptr,      \
                               nullptr, 0);                                                                  \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * COMPRESS_WARPS)                                        \
    mla_compress_rope_##SUFFIX(const T* kv, const float* kv_norm_weight, T* latent, int n_tokens, int d_c,    \
                               int d_rope, float eps, const long long* positions, const float* cos_table,    \
                               const float* sin_table, int max_seq_len) {                                    \
        compress_row<T, true>(kv, kv_norm_weight, latent, n_tokens, d_c, d_rope, eps, positions, cos_table,   \
                              sin_table, max_seq_len);                                                       \
    }

COMPRESS_KERNELS(f32, float)
COMPRESS_KERNELS(bf16, __nv_bfloat16)
