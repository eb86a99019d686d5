// Block quantisation to FP8 e4m3, one scale per block of `block_size` values:
//
//   amax_b = max(max_{i in b} |x_i|, 1e-4)
//   s_b    = amax_b * float32(1 / 448)         (ue8m0 = 0: plain scale, as the official kernel computes it)
//   s_b    = 2^ceil(log2(amax_b / 448))        (ue8m0 = 1: a power of two)
//   x_q,i  = e4m3(clamp(x_i / s_b, -448, 448)) (round to nearest even)
//
//   act_quant_f32   x float32  [n_blocks * block_size] -> x_fp8 uint8 (e4m3 bytes), scales float32 [n_blocks]
//   act_quant_bf16  x bfloat16, the same
//   act_quant_b128_f32 / _bf16   the same for block_size = 128 only (the indexer's), faster
//
// Kernels, as a progression (dsa_tutorial.fp8.ACT_QUANT_KERNELS lists them):
//   kernel 1 (act_quant_f32 / _bf16): one warp per quantisation block, any block_size that is a
//     multiple of 32; a block of the grid holds ACT_QUANT_WARPS warps. Each lane strides over its
//     block (coalesced 128-byte warp loads of 4-byte or 2-byte elements), keeps the largest |x| it
//     saw, and a shuffle tree gives the block's amax to every lane; then each lane re-reads (from
//     L1) and writes its bytes one at a time. block_size must be a multiple of 32 (checked by
//     dsa_tutorial.fp8.act_quant_cuda).
//   kernel 2 (act_quant_b128_f32 / _bf16): block_size = 128, so a lane owns 4 consecutive values:
//     one 16-byte (float32) or 8-byte (bf16) load, kept in registers (no second read), and one
//     4-byte store of its 4 e4m3 bytes. Each warp takes B128_BLOCKS_PER_WARP consecutive blocks and
//     issues all their loads before the first reduction, so 4 loads a lane are in flight (memory
//     bound: bytes in flight per SM is what sets the speed). x must be 16-byte aligned (checked in
//     Python; a fresh or row-sliced tensor is).
//
// Bit-exact with dsa_tutorial.fp8.act_quant (the reference): the plain scale is one IEEE float32
// multiplication by the float32 nearest 1/448 in both (not a division by 448: the two differ in the
// last bit for about half of all amax), x / s is an IEEE float32 division in both (no fast-math
// here), ceil(log2(.)) is read off the float's bits, and __nv_cvt_float_to_fp8 with __NV_SATFINITE
// rounds to nearest even like torch's cast. The ue8m0 scale does not depend on that choice: the
// product and the quotient differ by at most one ulp, and no float32 amax makes them straddle a
// power of two (see dsa_tutorial.fp8.block_scales).
//
// Memory: every load and store is inside x, x_fp8 and scales for any values (no index comes from
// the data).
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#define ACT_QUANT_WARPS 8                    // warps a block of the grid: one quantisation block each (kernel 1)
#define ACT_QUANT_THREADS (32 * ACT_QUANT_WARPS)
#define FP8_E4M3_MAX 448.0f
#define FP8_E4M3_MAX_INV (1.0f / 448.0f)      // float32(1/448): a constant expression in float, rounded once
#define AMAX_FLOOR 1e-4f

__device__ __forceinline__ float load_as_float(const float* x, size_t i) { return x[i]; }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* x, size_t i) { return __bfloat162float(x[i]); }

// s = 2^ceil(log2 s) for a positive normal float: the exponent field, plus one unless the
// mantissa is zero (s already a power of two).
__device__ __forceinline__ float round_scale_to_power_of_two(float s) {
    const unsigned bits = __float_as_uint(s);
    const int exponent = (int)((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0 ? 1 : 0);
    return __uint_as_float((unsigned)(exponent + 127) << 23);
}

template <typename T>
__device__ void act_quant_block(const T* __restrict__ x, unsigned char* __restrict__ x_fp8, float* __restrict__ scales,
                                int n_blocks, int block_size, int ue8m0) {
    const int lane = threadIdx.x % 32;
    const int block = blockIdx.x * ACT_QUANT_WARPS + threadIdx.x / 32;
    if (block >= n_blocks) return;  // whole warp leaves together; no block-wide barrier below
    const size_t base = (size_t)block * block_size;

    // amax_b = max_i |x_i|: per lane, then a butterfly over the warp
    float amax = 0.f;
    for (int i = lane; i < block_size; i += 32) amax = fmaxf(amax, fabsf(load_as_float(x, base + i)));
    for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));

    // s_b = max(amax, 1e-4) * float32(1/448), rounded up to a power of two for ue8m0
    float scale = fmaxf(amax, AMAX_FLOOR) * FP8_E4M3_MAX_INV;
    if (ue8m0) scale = round_scale_to_power_of_two(scale);
    if (lane == 0) scales[block] = scale;

    // x_q = e4m3(clamp(x / s, -448, 448)); SATFINITE would saturate too, the clamp states the rule
    for (int i = lane; i < block_size; i += 32) {
        const float v = fminf(fmaxf(load_as_float(x, base + i) / scale, -FP8_E4M3_MAX), FP8_E4M3_MAX);
        x_fp8[base + i] = (unsigned char)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    }
}

extern "C" __global__ void __launch_bounds__(ACT_QUANT_THREADS)
act_quant_f32(const float* x, unsigned char* x_fp8, float* scales, int n_blocks, int block_size, int ue8m0) {
    act_quant_block<float>(x, x_fp8, scales, n_blocks, block_size, ue8m0);
}

extern "C" __global__ void __launch_bounds__(ACT_QUANT_THREADS)
act_quant_bf16(const __nv_bfloat16* x, unsigned char* x_fp8, float* scales, int n_blocks, int block_size, int ue8m0) {
    act_quant_block<__nv_bfloat16>(x, x_fp8, scales, n_blocks, block_size, ue8m0);
}

// ------------------------------------------------------------------------------------ kernel 2

#define B128_BLOCKS_PER_WARP 4

__device__ __forceinline__ void load4(const float* x, size_t i, float (&v)[4]) {
    const float4 f = *reinterpret_cast<const float4*>(x + i);  // 16-byte aligned: i is a multiple of 4
    v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* x, size_t i, float (&v)[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(x + i);  // 8-byte aligned
    const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
    const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
    v[0] = __low2float(lo); v[1] = __high2float(lo); v[2] = __low2float(hi); v[3] = __high2float(hi);
}

template <typename T>
__device__ void act_quant_block128(const T* __restrict__ x, unsigned char* __restrict__ x_fp8, float* __restrict__ scales,
                                   int n_blocks, int ue8m0) {
    const int lane = threadIdx.x % 32;
    const int first = (blockIdx.x * ACT_QUANT_WARPS + threadIdx.x / 32) * B128_BLOCKS_PER_WARP;
    // x[128 block + 4 lane .. + 3] of each of the warp's blocks, all loads issued before any use
    float v[B128_BLOCKS_PER_WARP][4] = {};
    #pragma unroll
    for (int b = 0; b < B128_BLOCKS_PER_WARP; ++b)
        if (first + b < n_blocks) load4(x, (size_t)(first + b) * 128 + 4 * lane, v[b]);
    #pragma unroll
    for (int b = 0; b < B128_BLOCKS_PER_WARP; ++b) {
        const int block = first + b;
        if (block >= n_blocks) break;  // warp-uniform
        // amax_b = max_i |x_i|: 4 values a lane, then a butterfly over the warp
        float amax = fmaxf(fmaxf(fabsf(v[b][0]), fabsf(v[b][1])), fmaxf(fabsf(v[b][2]), fabsf(v[b][3])));
        for (int offset = 16; offset > 0; offset >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
        // s_b = max(amax, 1e-4) * float32(1/448), rounded up to a power of two for ue8m0
        float scale = fmaxf(amax, AMAX_FLOOR) * FP8_E4M3_MAX_INV;
        if (ue8m0) scale = round_scale_to_power_of_two(scale);
        if (lane == 0) scales[block] = scale;
        // x_q = e4m3(clamp(x / s, -448, 448)), 4 bytes packed little end first into one store
        unsigned packed = 0;
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float q = fminf(fmaxf(v[b][e] / scale, -FP8_E4M3_MAX), FP8_E4M3_MAX);
            packed |= (unsigned)(unsigned char)__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3) << (8 * e);
        }
        *reinterpret_cast<unsigned*>(x_fp8 + (size_t)block * 128 + 4 * lane) = packed;
    }
}

extern "C" __global__ void __launch_bounds__(ACT_QUANT_THREADS)
act_quant_b128_f32(const float* x, unsigned char* x_fp8, float* scales, int n_blocks, int ue8m0) {
    act_quant_block128<float>(x, x_fp8, scales, n_blocks, ue8m0);
}

extern "C" __global__ void __launch_bounds__(ACT_QUANT_THREADS)
act_quant_b128_bf16(const __nv_bfloat16* x, unsigned char* x_fp8, float* scales, int n_blocks, int ue8m0) {
    act_quant_block128<__nv_bfloat16>(x, x_fp8, scales, n_blocks, ue8m0);
}
