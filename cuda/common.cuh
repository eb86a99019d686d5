// Device helpers shared by several kernels of the book: `#include "common.cuh"` (the loader,
// dsa_tutorial.kernels, compiles every cuda/*.cu with -I cuda/).
//
// Everything here is a __forceinline__ function (inlined where it is called, so moving it here
// changes no kernel's code) or a constant. What a single kernel file needs stays in that file.
//
//   NEG_INF                         -infinity as a float constant
//   to_float / from_float           float32 or bfloat16 <-> float32
//   unpack16 / pack16               one 16-byte vector <-> 4 float32 or 8 bfloat16 values as floats
//   load_floats<N>                  N consecutive float32 values in 8- or 16-byte loads
//   load_pair                       two adjacent bfloat16 as one 32-bit register
//   smem_address                    a generic pointer to shared memory -> its 32-bit shared address
//   cp_async_16, cp_async_commit,   asynchronous 16-byte global -> shared copies, and how to wait
//   cp_async_wait<N>                for them
//   ldmatrix_x4 (and _trans)        four 8 x 8 matrices of 16-bit values from shared memory (transposed)
//   mma_bf16_16816 (and _free),     one warp-wide tensor-core product: bf16, f16 or e4m3 inputs,
//   mma_f16_16816, mma_e4m3_16832   float32 accumulators
//   e4m3x4_to_f16x4                 four FP8 e4m3 values -> four f16 values (exact)
//   swizzled                        where a 16-byte chunk of a 128-byte key row sits in a tile
//   e4m3_key_scores, f16_key_scores one warp's 16 keys x 32 heads of indexer scores (mma.sync)
//   add_weighted_relu, quad_sum     the indexer's head sum on mma accumulators, and over a row's lanes
//   ld_shared_f2                    a float2 from shared memory, re-read at every use
//   st_shared_v4                    16 bytes to a shared-memory address (32-bit, the shared window)
//   fill_neg_inf                    a warp writes -inf to a range of a float or bf16 row
#pragma once

#include <cuda_bf16.h>

#define NEG_INF (-__int_as_float(0x7f800000))

// ------------------------------------------------------------------------------- conversions

// T -> float32 and back, for kernels templated on the storage type (float or __nv_bfloat16);
// bfloat16 -> float32 is exact, float32 -> bfloat16 rounds to nearest even.
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// 16 bytes <-> 4 float32 or 8 bf16 values as floats, with explicit bit operations (so that the
// compiler keeps one 16-byte load or store). bf16 -> float32 is exact: the 16 bits shifted up; the
// low address (the low half of a 32-bit word) holds the first value.
__device__ __forceinline__ void unpack16(const uint4& raw, float (&v)[4]) {
    v[0] = __uint_as_float(raw.x), v[1] = __uint_as_float(raw.y), v[2] = __uint_as_float(raw.z), v[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack16(const uint4& raw, float (&v)[8]) {
    const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) v[2 * j] = __uint_as_float(w[j] << 16), v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
}
__device__ __forceinline__ uint4 pack16(const float (&v)[4]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
}
__device__ __forceinline__ uint4 pack16(const float (&v)[8]) {  // round to nearest even, as __float2bfloat16
    unsigned w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
        w[j] = (unsigned)__bfloat16_as_ushort(__float2bfloat16(v[2 * j])) |
               ((unsigned)__bfloat16_as_ushort(__float2bfloat16(v[2 * j + 1])) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// N consecutive floats: N = 2 as one float2 (p 8-byte aligned), N = 4, 8, ... as float4s (p 16-byte aligned)
template <int N> __device__ __forceinline__ void load_floats(const float* p, float (&v)[N]) {
    if constexpr (N == 2) {
        const float2 t = *reinterpret_cast<const float2*>(p);
        v[0] = t.x, v[1] = t.y;
    } else {
#pragma unroll
        for (int j = 0; j < N; j += 4) {
            const float4 t = *reinterpret_cast<const float4*>(p + j);
            v[j] = t.x, v[j + 1] = t.y, v[j + 2] = t.z, v[j + 3] = t.w;
        }
    }
}

// Two adjacent bf16 (p 4-byte aligned) as one 32-bit register, the lower address in the low half:
// the packing every mma fragment register uses.
__device__ __forceinline__ unsigned load_pair(const __nv_bfloat16* p) { return *reinterpret_cast<const unsigned*>(p); }

// ------------------------------------------------------------------- shared memory and cp.async

// The instructions below name shared memory by its 32-bit address in the shared window, not by a
// generic (64-bit) pointer: cvta.to.shared converts one into the other.
__device__ __forceinline__ unsigned smem_address(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// cp.async copies 16 bytes from global to shared memory without passing through registers, and
// without waiting: the thread goes on while the copy is in flight (.cg: through L2 only, not L1).
// Only the first src_bytes (0 or 16 here) are read; the rest of the 16 bytes is filled with zeros,
// so src_bytes = 0 writes 16 zeros and reads nothing (the kernels still pass an in-bounds src).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(src_bytes));
}
// Closes a group: every cp.async this thread issued since the previous commit forms one group.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight (N = 0: all have
// landed). A pipeline of S stages waits with N = S - 2: the oldest group is in, the newer ones keep
// flying. It covers this thread's own copies only: __syncthreads() must follow before other
// threads read what they copied.
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ldmatrix.x4: the warp loads four 8 x 8 matrices of 16-bit values (each 8 rows of 16 bytes) from
// shared memory. Lanes 8j .. 8j + 7 give the addresses of rows 0 .. 7 of matrix j (each row 16-byte
// aligned, anywhere in shared memory); register j of lane l receives row l / 4, values 2 (l % 4)
// and 2 (l % 4) + 1 of matrix j (for 8-bit data: bytes 4 (l % 4) .. + 3). That is the register
// layout of mma fragments, so with the four matrices picked as the four 8 x 8 quarters of a
// 16 x 16 tile one ldmatrix.x4 gives a whole A fragment, or the B fragments of two n-tiles.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row_address)));
}
// The same with .trans: each 8x8 matrix arrives transposed (lane 4g + t gets rows 2t, 2t + 1 of column
// g): the B fragments of P V from value rows stored key by key.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row_address)));
}

// ---------------------------------------------------------------------------- tensor cores
// mma.sync: the 32 lanes of a warp together compute C[16 x 8] += A[16 x K] B[K x 8], each lane
// holding a fixed piece (a fragment) of A, B and C in registers. With lane = 4 g + t (PTX ISA,
// m16n8k16 with 16-bit inputs; each 32-bit register holds two values, the lower k in the low half):
//   A (16 x 16, row-major)  a0: (row g, k 2t, 2t+1)    a1: (row g+8, k 2t, 2t+1)
//                           a2: (row g, k 2t+8, 2t+9)  a3: (row g+8, k 2t+8, 2t+9)
//   B (16 x 8, "col")       b0: (k 2t, 2t+1, col g)    b1: (k 2t+8, 2t+9, col g)
//   C (16 x 8, float32)     c0, c1: (row g, col 2t, 2t+1)   c2, c3: (row g+8, col 2t, 2t+1)

// C[16 x 8] += A[16 x 16] B[16 x 8], bf16 inputs, float32 accumulation. `asm volatile`: the
// compiler keeps it in program order with the other volatile asm (ldmatrix, cp.async) and never
// removes it.
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// The same mma, not volatile: the compiler may move it (interleave it with the loads). Same
// instruction, same results; only the schedule, and so registers and speed, can differ: each
// kernel keeps the form it was tuned with.
__device__ __forceinline__ void mma_bf16_16816_free(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// C[16 x 8] += A[16 x 16] * B[16 x 8], f16 inputs, float32 accumulation (fragments as above).
__device__ __forceinline__ void mma_f16_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// C[16 x 8] += A[16 x 32] * B[32 x 8], e4m3 inputs, float32 accumulation. Each register holds four
// 8-bit values (lowest address in the low byte); fragments (PTX ISA, m16n8k32 with 8-bit types):
//   A a0: row g, k 4t..4t+3   a1: row g+8, k 4t..   a2: row g, k 16+4t..   a3: row g+8, k 16+4t..
//   B b0: col g, k 4t..4t+3   b1: col g, k 16+4t..16+4t+3          C as for m16n8k16.
// sm_90 has no FP8 mma.sync: ptxas lowers it to f16 conversions of both operands and two f16 mma.
__device__ __forceinline__ void mma_e4m3_16832(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four e4m3 bytes (one 32-bit register, little end first) -> two f16x2 registers: lo gets bytes
// 0, 1 and hi bytes 2, 3 (each f16x2 keeps the lower address in its lower half). Exact: every e4m3
// value is an f16 value.
__device__ __forceinline__ void e4m3x4_to_f16x4(unsigned x, unsigned& lo, unsigned& hi) {
    asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
        : "=r"(lo), "=r"(hi) : "r"(x));
}

// ------------------------------------------------------------------------ indexer score tiles
// The FP8 logits kernels keep key tiles in shared memory as rows of 128 bytes (one key, D = 128
// e4m3 values) with an XOR swizzle: the 16-byte chunk c of row r sits at chunk c ^ (r % 8), so the
// 8 rows one ldmatrix phase reads fall in 8 different bank groups (and it is wgmma's "128-byte
// swizzle", cuda/wgmma.cuh). Byte offset of chunk `chunk` of row `row`:
__device__ __forceinline__ int swizzled(int row, int chunk) { return row * 128 + ((chunk ^ (row % 8)) * 16); }

// scores of keys 16 mt .. 16 mt + 15 of `tile` (rows of a swizzled tile) times the 4 head n-tiles
// 4 hg .. 4 hg + 3 of q, e4m3 mma.sync m16n8k32 over the four 32-wide slices of D: acc[n] is the
// C fragment of n-tile 4 hg + n. q_frag[nt][kk] = the (b0, b1) B fragment of n-tile nt, slice kk.
// ldmatrix_x4: lanes 0-15 address rows mt * 16 + lane of chunk 2 kk, lanes 16-31 of chunk 2 kk + 1.
template <int N_TILES>
__device__ __forceinline__ void e4m3_key_scores(float (&acc)[4][4], const unsigned char* tile, int mt,
                                                const unsigned (&q_frag)[N_TILES][4][2], int hg, int lane) {
#pragma unroll
    for (int n = 0; n < 4; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        unsigned a[4];
        ldmatrix_x4(a, tile + swizzled(mt * 16 + lane % 16, 2 * kk + lane / 16));
#pragma unroll
        for (int n = 0; n < 4; ++n) mma_e4m3_16832(acc[n], a, q_frag[4 * hg + n][kk][0], q_frag[4 * hg + n][kk][1]);
    }
}

// The same 16 keys x 4 n-tiles on the f16 path (sm_90 has no FP8 mma.sync): each key fragment is
// converted to f16 once and used by the 4 n-tiles; q_frag[n][s] = the f16 (b0, b1) fragment of n-tile n,
// 16-wide slice s of D. Lane t takes bytes 16 s + 4t .. + 3 of a key as "k = 2t, 2t+1" (first f16
// pair) and "k = 2t+8, 2t+9" (second); q's fragments follow the same rule, so each q[d] meets k[d].
__device__ __forceinline__ void f16_key_scores(float (&acc)[4][4], const unsigned char* tile, int mt,
                                               const unsigned (&q_frag)[4][8][2], int lane) {
#pragma unroll
    for (int n = 0; n < 4; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        // bytes of keys g, g+8 in the 16-byte chunks 2kk and 2kk+1 (slices s = 2kk, 2kk+1 of D)
        unsigned k_bytes[4], a[4];
        ldmatrix_x4(k_bytes, tile + swizzled(mt * 16 + lane % 16, 2 * kk + lane / 16));
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            e4m3x4_to_f16x4(k_bytes[2 * s], a[0], a[2]);      // key g
            e4m3x4_to_f16x4(k_bytes[2 * s + 1], a[1], a[3]);  // key g + 8
#pragma unroll
            for (int n = 0; n < 4; ++n) mma_f16_16816(acc[n], a, q_frag[n][2 * kk + s][0], q_frag[n][2 * kk + s][1]);
        }
    }
}

// One 8-head n-tile of sum_h w_h ReLU(score) from a C fragment (c0, c1: row g, heads 2t, 2t+1;
// c2, c3: row g + 8), with w = (w of head 2t, w of head 2t + 1): into lo (row g) and hi (row g + 8).
__device__ __forceinline__ void add_weighted_relu(float c0, float c1, float c2, float c3, float2 w, float& lo,
                                                  float& hi) {
    lo += w.x * fmaxf(c0, 0.f) + w.y * fmaxf(c1, 0.f);
    hi += w.x * fmaxf(c2, 0.f) + w.y * fmaxf(c3, 0.f);
}

// x summed over the 4 lanes of an mma row (lanes 4g .. 4g + 3), in each of them.
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ------------------------------------------------------------------------------------ misc

// A float2 from shared memory, re-read at every use (volatile): without it the compiler hoists
// the loop-invariant head weights into 2H/8 more registers and the q fragments spill.
__device__ __forceinline__ float2 ld_shared_f2(const float2* p) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(smem_address(p)));
    return v;
}

// 16 bytes to shared memory at a 32-bit shared-window address (smem_address): the address arithmetic stays
// 32-bit (a C++ pointer would be 64-bit generic arithmetic). volatile keeps its order with the other asm
// (fences, mbarrier arrivals) and does not stop the compiler moving ordinary loads around it.
__device__ __forceinline__ void st_shared_v4(unsigned address, uint4 v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

// The warp writes -inf to row[begin, end), 16 bytes at a time where the address allows (lane: 0..31).
__device__ __forceinline__ void fill_neg_inf(float* row, int begin, int end, int lane) {
    int head_end = begin;
    while (head_end < end && (reinterpret_cast<size_t>(row + head_end) & 15)) ++head_end;
    for (int j = begin + lane; j < head_end; j += 32) row[j] = NEG_INF;
    const int n_vec = (end - head_end) / 4;
    float4* vec = reinterpret_cast<float4*>(row + head_end);
    for (int v = lane; v < n_vec; v += 32) vec[v] = make_float4(NEG_INF, NEG_INF, NEG_INF, NEG_INF);
    for (int j = head_end + 4 * n_vec + lane; j < end; j += 32) row[j] = NEG_INF;
}
// The same for a bf16 row: 16-byte stores of 8 bf16 -inf (0xff80) between element stores at the unaligned
// ends.
__device__ __forceinline__ void fill_neg_inf(__nv_bfloat16* row, int begin, int end, int lane) {
    int head_end = begin;
    while (head_end < end && (reinterpret_cast<size_t>(row + head_end) & 15)) ++head_end;
    const __nv_bfloat16 neg_inf = __ushort_as_bfloat16(0xff80);
    for (int j = begin + lane; j < head_end; j += 32) row[j] = neg_inf;
    const int n_vec = (end - head_end) / 8;
    uint4* vec = reinterpret_cast<uint4*>(row + head_end);
    for (int v = lane; v < n_vec; v += 32) vec[v] = make_uint4(0xff80ff80u, 0xff80ff80u, 0xff80ff80u, 0xff80ff80u);
    for (int j = head_end + 8 * n_vec + lane; j < end; j += 32) row[j] = neg_inf;
}
