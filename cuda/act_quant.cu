// Block quantisation to FP8 e4m3, one scale per block of `block_size` values (SPEC section 3):
//
//   amax_b = max(max_{i in b} |x_i|, 1e-4)
//   s_b    = amax_b / 448                      (ue8m0 = 0: plain scale)
//   s_b    = 2^ceil(log2(amax_b / 448))        (ue8m0 = 1: a power of two)
//   x_q,i  = e4m3(clamp(x_i / s_b, -448, 448)) (round to nearest even)
//
//   act_quant_f32   x float32  [n_blocks * block_size] -> x_q uint8 (e4m3 bytes), s float32 [n_blocks]
//   act_quant_bf16  x bfloat16, the same
//
// One warp per quantisation block; a block of the grid holds ACT_QUANT_WARPS warps. Each lane
// strides over its block (coalesced 128-byte warp loads), keeps the largest |x| it saw, and a
// shuffle tree gives the block's amax to every lane; then each lane re-reads (from L1) and writes
// its bytes. block_size must be a multiple of 32 (checked by dsa_tutorial.fp8.act_quant_cuda).
//
// Bit-exact with dsa_tutorial.fp8.act_quant_reference: the division amax / 448 and x / s are IEEE
// float32 divisions in both (no fast-math here), ceil(log2(.)) is read off the float's bits, and
// __nv_cvt_float_to_fp8 with __NV_SATFINITE rounds to nearest even like torch's cast.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#define ACT_QUANT_WARPS 8
#define FP8_E4M3_MAX 448.0f
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
__device__ void act_quant_block(const T* __restrict__ x, unsigned char* __restrict__ x_q, float* __restrict__ s,
                                int n_blocks, int block_size, int ue8m0) {
    const int lane = threadIdx.x % 32;
    const int block = blockIdx.x * ACT_QUANT_WARPS + threadIdx.x / 32;
    if (block >= n_blocks) return;  // whole warp leaves together; no block-wide barrier below
    const size_t base = (size_t)block * block_size;

    // amax_b = max_i |x_i|: per lane, then a butterfly over the warp
    float amax = 0.f;
    for (int i = lane; i < block_size; i += 32) amax = fmaxf(amax, fabsf(load_as_float(x, base + i)));
    for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));

    // s_b = max(amax, 1e-4) / 448, rounded up to a power of two for ue8m0
    float scale = fmaxf(amax, AMAX_FLOOR) / FP8_E4M3_MAX;
    if (ue8m0) scale = round_scale_to_power_of_two(scale);
    if (lane == 0) s[block] = scale;

    // x_q = e4m3(clamp(x / s, -448, 448)); SATFINITE would saturate too, the clamp states the rule
    for (int i = lane; i < block_size; i += 32) {
        const float v = fminf(fmaxf(load_as_float(x, base + i) / scale, -FP8_E4M3_MAX), FP8_E4M3_MAX);
        x_q[base + i] = (unsigned char)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    }
}

extern "C" __global__ void __launch_bounds__(32 * ACT_QUANT_WARPS)
act_quant_f32(const float* x, unsigned char* x_q, float* s, int n_blocks, int block_size, int ue8m0) {
    act_quant_block<float>(x, x_q, s, n_blocks, block_size, ue8m0);
}

extern "C" __global__ void __launch_bounds__(32 * ACT_QUANT_WARPS)
act_quant_bf16(const __nv_bfloat16* x, unsigned char* x_q, float* s, int n_blocks, int block_size, int ue8m0) {
    act_quant_block<__nv_bfloat16>(x, x_q, s, n_blocks, block_size, ue8m0);
}
