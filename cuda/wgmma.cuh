// Hopper warpgroup matrix multiply (wgmma) from shared memory: FP8 e4m3 operands (the pieces that kernel 4
// of cuda/mqa_logits.cu and of cuda/paged_mqa_logits.cu share) and bf16 operands in column-blocked tiles
// (kernel 2 of cuda/sparse_mla_prefill.cu, kernel 3 of cuda/sparse_mla_decode_fp8.cu).
//
// wgmma exists only on the arch-specific target sm_90a (H100 / H200, compute capability 9.0
// exactly); dsa_tutorial.kernels compiles for sm_90a on such a GPU. Everything below is defined
// only when WGMMA_AVAILABLE is 1, and the kernels that use it compile to a trap elsewhere (Python
// never launches them there: kernels.wgmma_available).
//
// One wgmma.mma_async.m64nNk32 is issued by a warpgroup (4 consecutive warps, 128 threads, the first
// warp index a multiple of 4) and computes D[64 x N] (+)= A[64 x 32] B[32 x N] with float32
// accumulators spread over the 128 threads' registers. Both operands are read by the tensor cores
// straight from shared memory ("asynchronous proxy"); for 8-bit inputs both must be K-major: row m
// of A and column n of B each store their 32 k-values contiguously. Here a row is a key (A) or a
// (query, head) pair (B) and k runs along D, so the 128-byte rows of q and of the key cache are
// already K-major: a tile is simply rows of 128 bytes.
//
//   wgmma_desc(address)      the 64-bit shared-memory matrix descriptor of such a tile
//   wgmma_fence / _commit / _wait<N>, fence_operand     ordering around the asynchronous mma
//   fence_proxy_async        generic-proxy writes to shared memory (cp.async, st.shared) become
//                            visible to the tensor cores' reads
//   named_barrier_sync       a barrier for a subset of the block's warps (one warpgroup)
//   wgmma_m64n{32,64,128}k32_e4m3     the instruction, N = 32, 64, 128 (wgmma_m64k32_e4m3<N>: either)
//   weighted_relu_head_sums  the indexer epilogue sum_h w[h] ReLU(D[row, (q, h)]) on the accumulators
//   sum_for_lane             which of those sums a lane stores
//   blocked, WGMMA_BLOCK_BYTES, WGMMA_SMEM_ALIGN   the column-blocked bf16 tile [64 rows][576 values]:
//                            9 blocks of 64 values (128-byte rows, 8 KiB), each 128B-swizzled
//   align_smem               the dynamic shared memory's first WGMMA_SMEM_ALIGN-aligned byte
//   wgmma_desc_n_major       the descriptor of such a tile read N-major (transposed, V in P V)
//   wgmma_m64n32k16_bf16, wgmma_m64n256k16_bf16_nb   the bf16 instructions (B K-major; B N-major)
//   mbarrier_init / _arrive / _wait, setmaxnreg_dec / _inc   the hand-over between warp-specialised
//                            warpgroups (kernel 4 of cuda/sparse_mla_decode_fp8.cu, kernel 5 of cuda/mqa_logits.cu)
//   TensorMap, mbarrier_arrive_expect_tx, tma_load_2d, bulk_load, fence_mbarrier_init, prefetch_tensor_map
//                            the Tensor Memory Accelerator (TMA): tiles copied global -> shared by one thread,
//                            their arrival counted in bytes by an mbarrier (kernels 5 of cuda/mqa_logits.cu
//                            and cuda/paged_mqa_logits.cu)
// (cuda/sparse_mla_prefill.cu's kernel 2 header explains the bf16 layouts and descriptors in full.)
#pragma once

#include "common.cuh"  // smem_address, add_weighted_relu, quad_sum

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // compiling for sm_90a
#define WGMMA_AVAILABLE 1
#else
#define WGMMA_AVAILABLE 0
#endif

// bf16 column-blocked tiles (below): a 64-value column block of a 64-row tile, and the alignment of every
// tile (the 128-byte swizzle's atoms start on 1024-byte boundaries: descriptor base offset 0)
#define WGMMA_BLOCK_BYTES (64 * 128)
#define WGMMA_SMEM_ALIGN 1024

// The first WGMMA_SMEM_ALIGN-aligned byte of the dynamic shared memory `raw` (the launch asks for
// WGMMA_SMEM_ALIGN bytes more than the carve). By adding an offset to `raw` itself, not by rounding its
// generic address as an integer: the result then stays a pointer the compiler knows is in shared memory,
// and every access through it is an LDS/STS. A pointer rebuilt from a size_t has lost that, and the
// compiler emits generic loads and stores (LD.E/ST.E), which test the address's window each time.
__device__ __forceinline__ unsigned char* align_smem(unsigned char* raw) {
    return raw + ((WGMMA_SMEM_ALIGN - smem_address(raw) % WGMMA_SMEM_ALIGN) % WGMMA_SMEM_ALIGN);
}

#if WGMMA_AVAILABLE

// --------------------------------------------------------------------------- tile layout

// A tile is R rows of 128 bytes (R a multiple of 8) starting at a 1024-byte aligned shared address,
// in the "128-byte swizzle" layout the descriptor below announces: the 16-byte chunk c of row r is
// stored at chunk position c ^ (r % 8) of its row (the XOR swizzle the mma.sync kernels already use
// against bank conflicts; hardware applies the same XOR when it reads). 8 rows = 1024 bytes form one
// swizzle atom; atoms follow each other every 1024 bytes.
//
// Descriptor bits (PTX ISA, "Matrix Descriptor Format" of wgmma):
//   [0, 14)   start address >> 4
//   [16, 30)  leading-dimension byte offset >> 4: unused by swizzled K-major tiles (1 by convention)
//   [32, 46)  stride-dimension byte offset >> 4: from one 8-row atom to the next, 1024 bytes
//   [49, 52)  base offset: 0, because tiles start 1024-byte aligned
//   [62, 64)  swizzle mode: 1 = 128-byte swizzle
// k-step kk (bytes 32 kk .. 32 kk + 31 of every row) is the same descriptor with the start address
// advanced by 32 kk bytes, i.e. desc + 2 kk: the hardware swizzles the address it computes, so
// advancing inside the 128-byte row lands on the right (swizzled) chunks.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned address) {
    return (unsigned long long)((address & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}

// --------------------------------------------------------------------------- ordering

// Before the first wgmma of a group: orders this warp's earlier register accesses (the accumulators)
// before the asynchronous mma that reads and writes them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
// Closes the group: every wgmma issued since the previous commit.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed groups are in flight; only then may the accumulators be read.
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins a register at this point of the program: the compiler may not move uses of the accumulator
// across it (after wgmma_wait, before the epilogue reads them).
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
template <int R> __device__ __forceinline__ void fence_operands(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) fence_operand(d[i]);
}

// Shared memory written through the generic proxy (cp.async, ordinary stores) is read by wgmma
// through the async proxy: each writing thread fences after its writes have landed, then a barrier
// joins the warpgroup (or block) before the wgmma is issued.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// bar.sync with barrier id (1 .. 15; 0 is __syncthreads) for n_threads threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int n_threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n_threads) : "memory");
}

// --------------------------------------------------------------------------- the instruction

// D[64 x N] = A B (accumulate = 0) or D + A B (accumulate != 0); A [64 x 32] and B [N x 32] (K-major)
// e4m3 from the descriptors, D float32. Thread (warp w of the warpgroup, lane 4 g + t) holds, for
// each 8-column chunk c = 0 .. N/8 - 1:
//   d[4c + 0], d[4c + 1]: row 16 w + g,     columns 8c + 2t, 8c + 2t + 1
//   d[4c + 2], d[4c + 3]: row 16 w + g + 8, columns 8c + 2t, 8c + 2t + 1
// (the mma.sync C-fragment layout, repeated over the N/8 chunks and the 4 warps' 16-row slices).
// Generated text: one "+f" operand per accumulator register.
__device__ __forceinline__ void wgmma_m64n32k32_e4m3(float (&d)[16], unsigned long long desc_a, unsigned long long desc_b,
                                                     int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_m64n64k32_e4m3(float (&d)[32], unsigned long long desc_a, unsigned long long desc_b,
                                                     int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], unsigned long long desc_a, unsigned long long desc_b,
                                                     int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// The same for N chosen at compile time (32, 64 or 128).
template <int N>
__device__ __forceinline__ void wgmma_m64k32_e4m3(float (&d)[N / 2], unsigned long long desc_a, unsigned long long desc_b,
                                                  int accumulate) {
    static_assert(N == 32 || N == 64 || N == 128, "wgmma_m64k32_e4m3: N must be 32, 64 or 128");
    if constexpr (N == 32) wgmma_m64n32k32_e4m3(d, desc_a, desc_b, accumulate);
    else if constexpr (N == 64) wgmma_m64n64k32_e4m3(d, desc_a, desc_b, accumulate);
    else wgmma_m64n128k32_e4m3(d, desc_a, desc_b, accumulate);
}

// --------------------------------------------------------------------------- the indexer epilogue

// After one m64nNk32 product whose N columns are NQ = N / H (query or draft position q, head h)
// groups, column = q H + h: sums[q][r] = sum over h of w[q H + h] * ReLU(D[row_r, q H + h]) for this
// thread's rows row_0 = 16 w + g and row_1 = row_0 + 8, summed over the 4 lanes of a row (t = 0..3)
// so that every lane ends with the full sums. w_lane: the shared address of w_s[2t], where w_s
// holds the N weights in column order (w_s[8c + 2t] and w_s[8c + 2t + 1] are read for chunk c).
template <int N, int H>
__device__ __forceinline__ void weighted_relu_head_sums(const float (&d)[N / 2], unsigned w_lane,
                                                        float (&sums)[N / H][2]) {
    static_assert(N % H == 0 && H % 8 == 0, "a chunk of 8 columns must belong to one query");
#pragma unroll
    for (int q = 0; q < N / H; ++q) sums[q][0] = sums[q][1] = 0.f;
#pragma unroll
    for (int c = 0; c < N / 8; ++c) {
        const int q = 8 * c / H;
        float2 w;  // w_s[8c + 2t], w_s[8c + 2t + 1]; re-read every tile (volatile) rather than held in registers
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(w.x), "=f"(w.y) : "r"(w_lane + 32 * c));
        add_weighted_relu(d[4 * c + 0], d[4 * c + 1], d[4 * c + 2], d[4 * c + 3], w, sums[q][0], sums[q][1]);
    }
#pragma unroll
    for (int q = 0; q < N / H; ++q)
#pragma unroll
        for (int r = 0; r < 2; ++r) sums[q][r] = quad_sum(sums[q][r]);
}

// The sums are the same in the 4 lanes of a row; lane t stores value v = t (+ 4, ...) of them, in the
// order v = 2 q + r (query q, row r): sums[v / 2][v % 2], picked with compile-time indices (a run-time
// index into a register array would move it to local memory).
template <int NQ>
__device__ __forceinline__ float sum_for_lane(const float (&sums)[NQ][2], int v) {
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < NQ; ++q)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (2 * q + r == v) sum = sums[q][r];
    return sum;
}

// --------------------------------------------------------------------------- bf16 operands
// A bf16 tile of 64 rows x 576 values (Q, latents, or P with its 64 values) in 9 column blocks: block b
// holds values 64 b .. 64 b + 63 of every row, 128 bytes a row, WGMMA_BLOCK_BYTES apart, each block
// 128B-swizzled as above (so the K-major descriptor is wgmma_desc with k-step s at 8192 (s / 4) + 32 (s % 4)).

// Byte offset of 16-byte chunk `chunk` (0..71) of row `row` (0..63) in a column-blocked tile.
__device__ __forceinline__ unsigned blocked(int row, int chunk) {
    return (chunk / 8) * WGMMA_BLOCK_BYTES + row * 128 + (((chunk % 8) ^ (row % 8)) * 16);
}

// The N-major descriptor of a 128B-swizzled operand: LBO = 8192 (next 64 values), SBO = 1024 (next 8
// keys), swizzle mode 1. (The K-major one is wgmma_desc above: LBO 1, SBO 1024, mode 1.)
__device__ __forceinline__ unsigned long long wgmma_desc_n_major(unsigned address) {
    return (unsigned long long)((address & 0x3FFFF) >> 4) |
           ((unsigned long long)(WGMMA_BLOCK_BYTES >> 4) << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}

// D[64 x 32] (+)= A[64 x 16] B[16 x 32], bf16 from two K-major descriptors (imm-trans-a = imm-trans-b = 0).
__device__ __forceinline__ void wgmma_m64n32k16_bf16(float (&d)[16], unsigned long long desc_a,
                                                     unsigned long long desc_b, int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// D[64 x 256] += A[64 x 16] B[16 x 256], A K-major, B N-major (imm-trans-b = 1): 128 accumulators a thread.
#define ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                "+f"(d[i + 6]), "+f"(d[i + 7])
__device__ __forceinline__ void wgmma_m64n256k16_bf16_nb(float (&d)[128], unsigned long long desc_a,
                                                         unsigned long long desc_b) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
        "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
        "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
        "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, "
        "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, "
        "%92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, "
        "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "
        "%123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, 1;\n}\n"
        : ACC8(0), ACC8(8), ACC8(16), ACC8(24), ACC8(32), ACC8(40), ACC8(48), ACC8(56), ACC8(64), ACC8(72),
          ACC8(80), ACC8(88), ACC8(96), ACC8(104), ACC8(112), ACC8(120)
        : "l"(desc_a), "l"(desc_b), "r"(1));  // accumulate: O += P V always (O starts at 0)
}
#undef ACC8

// --------------------------------------------------------------------------- mbarriers and setmaxnreg

// mbarrier (PTX "Parallel Synchronization and Communication Instructions: mbarrier"): a 64-bit object in
// shared memory counting arrivals; when `count` threads have arrived its phase completes and the next
// begins (the phase's parity flips).
__device__ __forceinline__ void mbarrier_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// This thread's arrival (release semantics at CTA scope: its earlier writes are visible to whoever waits).
__device__ __forceinline__ void mbarrier_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed (acquire semantics); for a barrier in phase 0 that
// was never completed, parity 1 (the phase "before" it) passes at once.
__device__ __forceinline__ void mbarrier_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

// The warpgroup's registers a thread from here on (every warp of the warpgroup executes it).
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

#endif  // WGMMA_AVAILABLE

// --------------------------------------------------------------------------- TMA

// A CUtensorMap: 128 opaque bytes, 64-byte aligned, made on the host by the driver's cuTensorMapEncodeTiled
// (dsa_tutorial.kernels.tensor_map_2d) and passed by value as a `const __grid_constant__` kernel parameter,
// so that it stays in the parameter space and its address may be given to the TMA instructions. (NVRTC has
// no cuda.h: this is the same 128 bytes under our own name.) Defined for every target: the kernels'
// signatures name it even where their bodies are a trap.
struct alignas(64) TensorMap {
    unsigned long long bits[16];
};

#if WGMMA_AVAILABLE

// The barrier inits of one thread become visible to the other threads and to the async proxy (TMA's
// complete_tx) before anybody uses them (with the __syncthreads() that follows).
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// This thread's arrival on `bar` announcing `bytes` more bytes of transactions for the current phase: the
// phase completes when every arrival has come AND that many bytes have landed (each TMA copy that names
// the barrier counts its bytes down as they arrive: complete_tx).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Pulls the tensor map into the TMA unit's cache ahead of the first copy that names it.
__device__ __forceinline__ void prefetch_tensor_map(const TensorMap& map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&map)) : "memory");
}

// One TMA copy: the box of the 2-D tensor `map` whose first element has coordinates (x, y) (x the
// innermost dimension, in elements) -> shared memory at `dst` (laid out, and swizzled, as the map says;
// 1024-byte aligned for the 128-byte swizzle), its bytes counted on the mbarrier `bar`. Elements outside
// the tensor (any coordinate past its size, or negative) are not read: they land as zeros. Issued by one
// thread; the copy runs asynchronously, in the async proxy.
__device__ __forceinline__ void tma_load_2d(unsigned dst, const TensorMap& map, int x, int y, unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(x), "r"(y), "r"(bar)
        : "memory");
}

// One bulk copy without a tensor map: `bytes` contiguous bytes (a multiple of 16, both addresses 16-byte
// aligned) global `src` -> shared `dst`, counted on the mbarrier `bar` like a TMA tile (kernel 5 of
// cuda/paged_mqa_logits.cu: the 256 bytes of a cache block's scales).
__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(src)), "r"(bytes), "r"(bar)
                 : "memory");
}

#endif  // WGMMA_AVAILABLE
