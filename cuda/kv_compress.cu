// MLA compression, formula (1), from the output of the down-projection to the latent cache entry.
//
// The down-projection [c ; k_pe] = wkv_a h_t = [W^DKV h_t ; W^KR h_t] is a GEMM (left to cuBLAS);
// what follows it is memory-bound and is fused here, one read of the GEMM output, one write of the
// cache entry of d_c + d_R values (576 for V3.2):
//
//     c^KV_t = c / sqrt(mean_j(c_j^2) + eps) * kv_norm_weight          (kv_norm, formula 1)
//     k^R_t  = k_pe                  (kv_compress_*)        or
//     k^R_t  = RoPE(k_pe, m_t)       (kv_compress_rope_*, formula 3, interleaved pairs (2i, 2i+1))
//     latent[t] = [c^KV_t | k^R_t]
//
//   *_f32    kv, latent float32  [T, d_c + d_R]
//   *_bf16   kv, latent bfloat16 [T, d_c + d_R], float32 arithmetic
//   (kv_norm_weight float32 [d_c]; RoPE tables float32 [max_seq_len, d_R/2], see cuda/apply_rope.cu)
//
//   kernel 1  kv_compress[_rope]_{f32,bf16}       any d_c, d_R: one value per lane per step
//   kernel 2  kv_compress[_rope]_vec_{f32,bf16}   V3.2's d_c = 512, d_R = 64 as compile-time
//             constants: the whole row is loaded at once in 16-byte chunks (4 float32 / 8 bf16)
//             and kept in registers for the second pass
//
// Both: one warp per token, COMPRESS_WARPS tokens per block (COMPRESS_THREADS threads, a grid of
// ceil(T / COMPRESS_WARPS) blocks); the sum of squares is combined with a warp shuffle tree, so there
// is no shared memory and no __syncthreads: a warp whose token is past T just returns.
// Kernel 1: the lanes stride over the row (coalesced: 32 consecutive values per step); the second
// pass re-reads the row (from L1, it was just loaded) to scale it. Each lane has one 4- or 2-byte
// load in flight at a time: far from the bandwidth an H200 can deliver.
// Kernel 2: lane l loads chunks l, l + 32, ... of c (4 float4 or 2 x 8 bf16: 512 values a warp) and,
// for lanes l < d_R / 8 (bf16) or d_R / 4 (float32), chunk l of k_pe: 5 (float32) or 3 (bf16) 16-byte
// loads in flight per lane before the first is used, then one 16-byte store per chunk.
// A position outside the rotary table (m < 0 or m >= max_seq_len) writes NaN for that token's k^R and
// reads nothing: the kernels are memory-safe for any positions (the loader checks their range only
// when the package's data checks are on).
// Checked against dsa_tutorial.mla.kv_compress (+ rope.apply_rope); loader
// dsa_tutorial.mla.kv_compress_cuda (table KV_COMPRESS_KERNELS: kernel 2 wherever d_c = 512, d_R = 64
// and the tensors are 16-byte aligned, kernel 1 otherwise).
#include <cuda_bf16.h>

#include "common.cuh"  // to_float, from_float, unpack16, pack16, load_floats

#define COMPRESS_WARPS 8  // tokens (one warp each) per block
#define COMPRESS_THREADS (32 * COMPRESS_WARPS)

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
        if (m < 0 || m >= max_seq_len) {  // never read outside the table: NaN instead
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

#define COMPRESS_KERNELS(SUFFIX, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS)                                          \
    kv_compress_##SUFFIX(const T* kv, const float* kv_norm_weight, T* latent, int n_tokens, int d_c,        \
                         int d_rope, float eps) {                                                           \
        compress_row<T, false>(kv, kv_norm_weight, latent, n_tokens, d_c, d_rope, eps, nullptr, nullptr,    \
                               nullptr, 0);                                                                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS)                                          \
    kv_compress_rope_##SUFFIX(const T* kv, const float* kv_norm_weight, T* latent, int n_tokens, int d_c,   \
                              int d_rope, float eps, const long long* positions, const float* cos_table,    \
                              const float* sin_table, int max_seq_len) {                                    \
        compress_row<T, true>(kv, kv_norm_weight, latent, n_tokens, d_c, d_rope, eps, positions, cos_table, \
                              sin_table, max_seq_len);                                                      \
    }

COMPRESS_KERNELS(f32, float)
COMPRESS_KERNELS(bf16, __nv_bfloat16)

// ------------------------------------------------------------------------------------ kernel 2
#define COMPRESS_D_C 512  // V3.2's kv_lora_rank
#define COMPRESS_D_R 64   // V3.2's qk_rope_head_dim
// (16-byte chunks <-> floats: unpack16 / pack16, and load_floats, in cuda/common.cuh)

template <typename T, bool ROPE>
__device__ void compress_row_vec(const T* __restrict__ kv, const float* __restrict__ kv_norm_weight,
                                 T* __restrict__ latent, int n_tokens, float eps,
                                 const long long* __restrict__ positions, const float* __restrict__ cos_table,
                                 const float* __restrict__ sin_table, int max_seq_len) {
    constexpr int N = 16 / sizeof(T);                 // values per 16-byte chunk
    constexpr int C_CHUNKS = COMPRESS_D_C / (32 * N);  // chunks of c per lane: 4 (float32), 2 (bf16)
    constexpr int R_LANES = COMPRESS_D_R / N;          // lanes holding a chunk of k_pe: 16, 8
    constexpr int WIDTH = COMPRESS_D_C + COMPRESS_D_R, N_HALF = COMPRESS_D_R / 2;
    static_assert(COMPRESS_D_C % (32 * N) == 0 && COMPRESS_D_R % N == 0 && R_LANES <= 32, "chunking");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long t = (long long)blockIdx.x * COMPRESS_WARPS + warp;
    if (t >= n_tokens) return;  // the whole warp leaves: no barrier follows
    const T* kv_row = kv + t * WIDTH;    // [c (512) | k_pe (64)]
    T* latent_row = latent + t * WIDTH;  // [c^KV (512) | k^R (64)]

    // every load of the row first: chunk lane + 32 k of c, chunk lane of k_pe
    uint4 c_raw[C_CHUNKS], pe_raw = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int k = 0; k < C_CHUNKS; ++k) c_raw[k] = *reinterpret_cast<const uint4*>(kv_row + N * (lane + 32 * k));
    if (lane < R_LANES) pe_raw = *reinterpret_cast<const uint4*>(kv_row + COMPRESS_D_C + N * lane);
    float cos_mi[N / 2] = {}, sin_mi[N / 2] = {};  // the N/2 interleaved pairs of this lane's k_pe chunk
    bool inside = true;
    if (ROPE && lane < R_LANES) {
        const long long m = positions[t];
        inside = m >= 0 && m < max_seq_len;  // never read outside the table: NaN instead
        if (inside) {
            load_floats<N / 2>(cos_table + m * N_HALF + lane * (N / 2), cos_mi);
            load_floats<N / 2>(sin_table + m * N_HALF + lane * (N / 2), sin_mi);
        }
    }

    // mean_j(c_j^2): lane partial sums, then the warp tree
    float c[C_CHUNKS][N];
    float sum_sq = 0.f;
#pragma unroll
    for (int k = 0; k < C_CHUNKS; ++k) {
        unpack16(c_raw[k], c[k]);
#pragma unroll
        for (int j = 0; j < N; ++j) sum_sq += c[k][j] * c[k][j];
    }
    const float inv_rms = rsqrtf(warp_sum(sum_sq) / COMPRESS_D_C + eps);
    // c^KV_j = c_j * inv_rms * kv_norm_weight_j
#pragma unroll
    for (int k = 0; k < C_CHUNKS; ++k) {
        float weight[N];
        load_floats<N>(kv_norm_weight + N * (lane + 32 * k), weight);
#pragma unroll
        for (int j = 0; j < N; ++j) c[k][j] = c[k][j] * inv_rms * weight[j];
        __stwb(reinterpret_cast<uint4*>(latent_row + N * (lane + 32 * k)), pack16(c[k]));  // one 16-byte store
    }

    if (lane >= R_LANES) return;
    T* k_rope = latent_row + COMPRESS_D_C + N * lane;
    if (!ROPE) {
        __stwb(reinterpret_cast<uint4*>(k_rope), pe_raw);  // k^R = k_pe, copied
        return;
    }
    float x[N];
    unpack16(pe_raw, x);
#pragma unroll
    for (int p = 0; p < N / 2; ++p) {
        const float x_a = x[2 * p], x_b = x[2 * p + 1];
        // k^R_2i = x_2i cos - x_2i+1 sin,  k^R_2i+1 = x_2i sin + x_2i+1 cos  (NaN outside the table)
        x[2 * p] = inside ? x_a * cos_mi[p] - x_b * sin_mi[p] : __int_as_float(0x7fc00000);
        x[2 * p + 1] = inside ? x_a * sin_mi[p] + x_b * cos_mi[p] : __int_as_float(0x7fc00000);
    }
    __stwb(reinterpret_cast<uint4*>(k_rope), pack16(x));
}

#define COMPRESS_VEC_KERNELS(SUFFIX, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS)                                            \
    kv_compress_vec_##SUFFIX(const T* kv, const float* kv_norm_weight, T* latent, int n_tokens, float eps) {  \
        compress_row_vec<T, false>(kv, kv_norm_weight, latent, n_tokens, eps, nullptr, nullptr, nullptr, 0);  \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(COMPRESS_THREADS)                                            \
    kv_compress_rope_vec_##SUFFIX(const T* kv, const float* kv_norm_weight, T* latent, int n_tokens,          \
                                  float eps, const long long* positions, const float* cos_table,              \
                                  const float* sin_table, int max_seq_len) {                                  \
        compress_row_vec<T, true>(kv, kv_norm_weight, latent, n_tokens, eps, positions, cos_table, sin_table, \
                                  max_seq_len);                                                               \
    }

COMPRESS_VEC_KERNELS(f32, float)
COMPRESS_VEC_KERNELS(bf16, __nv_bfloat16)
