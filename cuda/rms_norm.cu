// RMSNorm, one row per block:   y = x / sqrt(mean(x^2) + eps) * weight
//
// The first kernel of the book, and the pattern every later file follows: plain CUDA C++,
// extern "C" kernels (no name mangling, so the loader finds them by name), compiled by
// dsa_tutorial.kernels with NVRTC and checked against dsa_tutorial.norm.rms_norm. Loader:
// dsa_tutorial.norm.rms_norm_cuda, which launches one block of RMS_THREADS threads per row and picks
// the kernel from its table RMS_NORM_KERNELS (kernel 2 wherever it applies).
//
// Kernel 1, rms_norm_f32 / rms_norm_bf16 (x, y [n_rows, dim], arithmetic in float32):
//   RMS_THREADS threads stride over the row, each keeps a partial sum of squares in a register;
//   a warp shuffle tree and one shared-memory round combine them; every thread then scales its own
//   elements. Any dim works. It reads x twice (the second time mostly from L2).
// Kernel 2, rms_norm_bf16_vec (bf16, dim % 8 == 0, dim <= RMS_THREADS * 8 * RMS_VECS, 16-byte aligned
// x, weight and y):
//   each thread loads its share of the row once, as 16-byte vectors of 8 bf16 held in registers,
//   so x is read from memory exactly once and every access is a full 16-byte transaction.
#include <cuda_bf16.h>

#include "common.cuh"  // to_float, from_float

#define RMS_THREADS 256

__device__ __forceinline__ float block_sum(float value) {
    __shared__ float warp_sums[RMS_THREADS / 32];
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_sums[warp] = value;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < RMS_THREADS / 32; ++w) total += warp_sums[w];
    return total;
}

template <typename T>
__device__ void rms_norm_row(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ y,
                             int n_rows, int dim, float eps) {
    const int row = blockIdx.x;
    if (row >= n_rows) return;  // whole block leaves together: no thread skips the barrier
    const T* x_row = x + (size_t)row * dim;
    T* y_row = y + (size_t)row * dim;
    // sum of squares: mean(x^2) = (1/dim) sum_i x_i^2
    float sum_sq = 0.f;
    for (int i = threadIdx.x; i < dim; i += RMS_THREADS) {
        const float v = to_float(x_row[i]);
        sum_sq += v * v;
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / dim + eps);
    // y_i = x_i * inv_rms * weight_i
    for (int i = threadIdx.x; i < dim; i += RMS_THREADS)
        y_row[i] = from_float<T>(to_float(x_row[i]) * inv_rms * to_float(weight[i]));
}

#define RMS_VECS 4  // 16-byte vectors per thread in kernel 2: rows up to 256 * 8 * 4 = 8192 values

extern "C" __global__ void __launch_bounds__(RMS_THREADS)
rms_norm_bf16_vec(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ weight,
                  __nv_bfloat16* __restrict__ y, int n_rows, int dim, float eps) {
    const int row = blockIdx.x;
    if (row >= n_rows) return;
    const int n_vec = dim / 8;  // 16-byte vectors in a row
    const uint4* x_row = reinterpret_cast<const uint4*>(x + (size_t)row * dim);
    uint4 held[RMS_VECS];       // this thread's vectors, indexed by compile-time constants only
    float sum_sq = 0.f;
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * RMS_THREADS;
        held[j] = v < n_vec ? x_row[v] : make_uint4(0, 0, 0, 0);
        const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&held[j]);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const float2 f = __bfloat1622float2(pairs[p]);
            sum_sq += f.x * f.x + f.y * f.y;  // sum_i x_i^2 (zero padding adds nothing)
        }
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / dim + eps);
    const uint4* w_vec = reinterpret_cast<const uint4*>(weight);
    uint4* y_row = reinterpret_cast<uint4*>(y + (size_t)row * dim);
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * RMS_THREADS;
        if (v >= n_vec) continue;
        const uint4 w = w_vec[v];
        const __nv_bfloat162* x_pairs = reinterpret_cast<const __nv_bfloat162*>(&held[j]);
        const __nv_bfloat162* w_pairs = reinterpret_cast<const __nv_bfloat162*>(&w);
        uint4 out;
        __nv_bfloat162* out_pairs = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const float2 xf = __bfloat1622float2(x_pairs[p]), wf = __bfloat1622float2(w_pairs[p]);
            // y_i = x_i * inv_rms * weight_i
            out_pairs[p] = __floats2bfloat162_rn(xf.x * inv_rms * wf.x, xf.y * inv_rms * wf.y);
        }
        y_row[v] = out;
    }
}

extern "C" __global__ void __launch_bounds__(RMS_THREADS)
rms_norm_f32(const float* x, const float* weight, float* y, int n_rows, int dim, float eps) {
    rms_norm_row<float>(x, weight, y, n_rows, dim, eps);
}

extern "C" __global__ void __launch_bounds__(RMS_THREADS)
rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* weight, __nv_bfloat16* y, int n_rows, int dim,
              float eps) {
    rms_norm_row<__nv_bfloat16>(x, weight, y, n_rows, dim, eps);
}
