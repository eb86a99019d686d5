// FP8 MQA logits of the lightning indexer (DeepGEMM's fp8_mqa_logits;
// dsa_tutorial.fp8.mqa_logits is the reference, mqa_logits_cuda the launcher):
//
//   logits[i, j] = sum_h w[i, h] * ReLU(q[i, h] . k[j]) * k_scale[j]     for ks[i] <= j < ke[i]
//   logits[i, j] = -inf                                                   elsewhere (clean_logits)
//
// (k_scale > 0, so ReLU(x * s) = ReLU(x) * s and the scale leaves the head sum.)
//   q       e4m3 [S_q, H, D]   one indexer query per token, H heads, D = 128
//   k       e4m3 [S_k, D]      one indexer key per token, shared by all heads (MQA)
//   k_scale fp32 [S_k]         one power-of-two block scale per key (act_quant, block 128)
//   weights fp32 [S_q, H]      head weights with the q scale and d_I^-0.5 folded in
//   ks, ke  int32 [S_q]        the key range of query i (a packed batch of causal prefills)
//   logits  fp32 or bf16 [S_q, S_k]   (DeepGEMM's logits_dtype)
//
// Every kernel is compiled twice, once per storage type of the logits (template parameter T, entry
// suffix _f32 / _bf16). Both compute the same float32 logit; the bf16 ones round it to nearest even
// as they store it (-inf stays -inf), so a bf16 entry writes exactly the f32 entry's logits rounded,
// in half the bytes: at long contexts the logits are most of what the kernels write.
//
// Kernels, as a progression (dsa_tutorial.fp8.MQA_LOGITS_KERNELS; each checked against fp8.mqa_logits):
//   mqa_logits_naive          kernel 1: one thread per (i, j), H * D scalar multiply-adds in
//                             float32 after converting each e4m3 byte. The specification in CUDA.
//   mqa_logits_e4m3_h64/_h32  kernel 2: FP8 tensor cores. A block of 12 warps owns 12 consecutive
//                             queries (one per warp) and streams the union of their key ranges
//                             through shared memory in tiles of 64 keys (cp.async, 4 stages).
//                             Per 16 keys a warp computes the [16 keys x H heads] score tile with
//                             mma.sync m16n8k32 e4m3 -> f32 over the four 32-wide slices of D:
//                             A = the keys (from shared memory with ldmatrix), B = q[i] (kept in
//                             registers for the whole kernel: H * D bytes over 32 lanes). Then
//                             ReLU, times w, a sum over the heads in registers (each lane holds 2
//                             heads of every 8-head n-tile) and two shuffles (the 4 lanes of a
//                             row), times k_scale, and one store per key.
//   mqa_logits_f16_h64/_h32   kernel 3: what kernel 2 costs on Hopper. sm_90 has no FP8 mma.sync:
//                             ptxas lowers each m16n8k32 e4m3 to f16 conversions of both operands
//                             (24 bytes a lane: about 12 cvt) plus two f16 m16n8k16 mma (NVIDIA,
//                             CUTLASS issue 1986), so kernel 2 spends most of its issue slots
//                             converting the same bytes again and again. Kernel 3 converts once:
//                             q[i] to f16 B fragments at the start (registers), each ldmatrix'ed
//                             key fragment once per warp for
//                             4 head tiles (cvt.rn.f16x2.e4m3x2), then f16 mma.sync m16n8k16 with
//                             float32 accumulation: the same exact products (every e4m3 value is an
//                             f16 value). f16 q takes twice the registers, so a warp owns 32 heads
//                             of one query (64 registers of q): 8 warps a block = 4 queries (H 64)
//                             or 8 (H 32), two blocks of <= 128 registers a thread per SM. A warp
//                             writes k_scale * (its head sum) per key to shared memory; after the
//                             barrier that starts the next key tile, the warps of a query add their
//                             halves and store 32 consecutive keys each (coalesced). Same pipeline,
//                             swizzle and bounds as kernel 2.
//   mqa_logits_wgmma_h64/_h32 kernel 4 (sm_90a only): Hopper's warpgroup mma (wgmma, see
//                             cuda/wgmma.cuh), which reads e4m3 straight from shared memory at the
//                             full FP8 rate. A block is one warpgroup owning 128 / H queries; per tile
//                             of 64 keys, 4 wgmma m64n128k32 give scores[64 keys][(query, head)],
//                             then kernel 2's epilogue. Its tensor cores accumulate FP8 products with
//                             fewer bits than float32 (about 1e-4 of the summed magnitudes here).
//   mqa_logits_tma_h64/_h32   kernel 5 (sm_90a only): kernel 4's wgmma and epilogue, fed by TMA (the
//                             Tensor Memory Accelerator: one thread copies a whole tile) into a ring of
//                             key tiles handed over through mbarriers; one producer thread, two consumer
//                             warpgroups of 256 / H queries sharing every key tile (4x kernel 4's reuse
//                             at H = 64), setmaxnreg, one persistent block an SM.
//
// Fragment layouts (PTX ISA, mma.m16n8k32 with 8-bit types), lane = 4 * g + t:
//   A (16 x 32, row-major) a0: row g, cols 4t..4t+3    a1: row g+8, cols 4t..4t+3
//                          a2: row g, cols 16+4t..     a3: row g+8, cols 16+4t..
//   B (32 x 8, col-major)  b0: col g, rows 4t..4t+3    b1: col g, rows 16+4t..16+4t+3
//   C (16 x 8, f32)        c0, c1: row g, cols 2t, 2t+1    c2, c3: row g+8, cols 2t, 2t+1
// Here A's rows are keys, B's columns are heads and the 32-wide k dimension is a slice of D.
//
// Shared memory holds a key tile as 64 rows of 128 bytes; the 16-byte chunk c of row r sits at
// chunk position c ^ (r % 8) (an XOR swizzle), so the 8 rows one ldmatrix phase reads fall in 8
// different bank groups instead of all in the same one.
//
// Bounds, for ANY values of ks and ke (dsa_tutorial checks them only with data checks on): each
// query's range is first clipped to the keys that exist, [max(ks, 0), min(ke, S_k)), empty when
// reversed (key_range), so a wild range reads and writes nothing outside k, k_scale and its own row:
// the row is then the logits of the clipped range. Rows i >= S_q do no work (their warp still joins
// the barriers); key tiles are loaded with zero fill past kv_end (the largest clipped ke of the
// block) so no load leaves [0, S_k); stores go only to keys < kv_end. Columns outside
// [kv_begin, kv_end) of the block are filled with -inf when clean_logits, and left untouched
// otherwise.
#include <cuda_fp8.h>

#include "common.cuh"  // NEG_INF, smem_address, cp_async_*, ldmatrix_x4, mma_*, e4m3x4_to_f16x4,
                       // ld_shared_f2, fill_neg_inf

#define HEAD_DIM 128             // D
#define QUERIES_PER_CTA 12       // one query per warp
#define THREADS (32 * QUERIES_PER_CTA)
#define BLOCK_KV 64              // keys per pipeline stage
#define STAGES 4                 // cp.async pipeline depth
#define CHUNKS_PER_ROW (HEAD_DIM / 16)
// q[i] alone takes H * D / 32 = 64 registers a lane; the kernel needs ~136 in all (it spills at
// 128), so a block of 12 warps (12 * 32 * 136 <= 65536 registers) fills an SM.
#define MAX_REGISTERS 136
#define NAIVE_THREADS 128        // kernel 1: keys a block, one a thread

// Query i's key range [ks[i], ke[i]) clipped to the keys that exist, [0, S_k), and empty (lo == hi)
// when reversed: what every kernel computes, whatever the values (data checks off).
__device__ __forceinline__ int2 key_range(const int* ks, const int* ke, int i, int S_k) {
    const int lo = min(max(ks[i], 0), S_k);
    return make_int2(lo, max(min(ke[i], S_k), lo));
}

// The union [kv_begin, kv_end) of the clipped ranges of queries first .. last - 1 that are not
// empty; [0, 0) when all are. 0 <= kv_begin <= kv_end <= S_k.
__device__ __forceinline__ void union_key_range(const int* ks, const int* ke, int first, int last, int S_k,
                                                int& kv_begin, int& kv_end) {
    kv_begin = S_k, kv_end = 0;
    for (int r = first; r < last; ++r) {
        const int2 range = key_range(ks, ke, r, S_k);
        if (range.x < range.y) kv_begin = min(kv_begin, range.x), kv_end = max(kv_end, range.y);
    }
    if (kv_end <= kv_begin) kv_begin = kv_end = 0;
}

// The entry points of kernels 2 to 4: one per head count H and storage type T of the logits (float:
// NAME_f32, __nv_bfloat16: NAME_bf16), calling the kernel's template with the launch bounds (or
// register cap) it was tuned with.
#define MQA_ENTRY_T(NAME, KERNEL, H, T, BOUNDS)                                                                  \
    extern "C" __global__ void BOUNDS NAME(const unsigned char* q, const unsigned char* k, const float* k_scale,  \
                                           const float* weights, const int* ks, const int* ke, T* logits,         \
                                           int S_q, int S_k, int clean_logits) {                                 \
        KERNEL<H, T>(q, k, k_scale, weights, ks, ke, logits, S_q, S_k, clean_logits);                            \
    }
#define MQA_ENTRY(NAME, KERNEL, H, BOUNDS)                                                                       \
    MQA_ENTRY_T(NAME##_f32, KERNEL, H, float, BOUNDS)                                                            \
    MQA_ENTRY_T(NAME##_bf16, KERNEL, H, __nv_bfloat16, BOUNDS)


// ------------------------------------------------------------------------------------ kernel 1

// One thread per (i, j): j < S_k and i < S_q are the only indices, so any ks, ke is memory-safe here
// (j outside [ks[i], ke[i]) is -inf: the clipped range, as in the other kernels).
template <typename T>
__device__ void mqa_logits_naive(const unsigned char* __restrict__ q, const unsigned char* __restrict__ k,
                                 const float* __restrict__ k_scale, const float* __restrict__ weights,
                                 const int* __restrict__ ks, const int* __restrict__ ke, T* __restrict__ logits,
                                 int S_q, int S_k, int H, int clean_logits) {
    const int i = blockIdx.y;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= S_q || j >= S_k) return;
    T* out = logits + (size_t)i * S_k + j;
    if (j < ks[i] || j >= ke[i]) {
        if (clean_logits) *out = from_float<T>(NEG_INF);
        return;
    }
    const __nv_fp8_e4m3* q_i = reinterpret_cast<const __nv_fp8_e4m3*>(q) + (size_t)i * H * HEAD_DIM;
    const __nv_fp8_e4m3* k_j = reinterpret_cast<const __nv_fp8_e4m3*>(k) + (size_t)j * HEAD_DIM;
    float logit = 0.f;
    for (int h = 0; h < H; ++h) {
        // q[i, h] . k[j]
        float score = 0.f;
        for (int d = 0; d < HEAD_DIM; ++d) score += float(q_i[h * HEAD_DIM + d]) * float(k_j[d]);
        // sum_h w[i, h] * ReLU(q[i, h] . k[j])
        logit += weights[(size_t)i * H + h] * fmaxf(score, 0.f);
    }
    // * k_scale[j], stored as T (bf16: rounded to nearest even)
    *out = from_float<T>(logit * k_scale[j]);
}

#define NAIVE_ENTRY(NAME, T)                                                                                     \
    extern "C" __global__ void __launch_bounds__(NAIVE_THREADS)                                                  \
        NAME(const unsigned char* q, const unsigned char* k, const float* k_scale, const float* weights,         \
             const int* ks, const int* ke, T* logits, int S_q, int S_k, int H, int clean_logits) {              \
        mqa_logits_naive<T>(q, k, k_scale, weights, ks, ke, logits, S_q, S_k, H, clean_logits);                  \
    }
NAIVE_ENTRY(mqa_logits_naive_f32, float)
NAIVE_ENTRY(mqa_logits_naive_bf16, __nv_bfloat16)

// ------------------------------------------------------------------------------------ kernel 2

// 4 bytes global -> shared, asynchronously (.ca, cached in L1 too: .cg takes 16-byte copies only);
// src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(src_bytes));
}

// ldmatrix_x4 (cuda/common.cuh) reads four 8x8 b16 matrices = 8 rows x 16 bytes of e4m3 each: the
// A fragment of mma_e4m3_16832 (also there). ld_shared_f2 re-reads the head weights at every use.

// Start loading key tile `tile` (keys kv_begin + 64 * tile + r) into pipeline stage `stage`.
template <int N_THREADS = THREADS>
__device__ __forceinline__ void load_key_tile(unsigned char* k_tile, float* scale_tile, const unsigned char* k,
                                              const float* k_scale, int kv_begin, int kv_end, int tile) {
    const int first = kv_begin + tile * BLOCK_KV;
    for (int c = threadIdx.x; c < BLOCK_KV * CHUNKS_PER_ROW; c += N_THREADS) {
        const int row = c / CHUNKS_PER_ROW, chunk = c % CHUNKS_PER_ROW;
        const int key = first + row;
        const bool inside = key < kv_end;  // past the block's last key: zeros, and no read
        const unsigned char* src = k + (size_t)(inside ? key : kv_begin) * HEAD_DIM + chunk * 16;
        cp_async_16(k_tile + swizzled(row, chunk), src, inside ? 16 : 0);
    }
    if (threadIdx.x < BLOCK_KV) {
        const int key = first + threadIdx.x;
        const bool inside = key < kv_end;
        cp_async_4(scale_tile + threadIdx.x, k_scale + (inside ? key : kv_begin), inside ? 4 : 0);
    }
}

template <int H, typename T>
__device__ void mqa_logits_e4m3(const unsigned char* __restrict__ q, const unsigned char* __restrict__ k,
                                const float* __restrict__ k_scale, const float* __restrict__ weights,
                                const int* __restrict__ ks, const int* __restrict__ ke, T* __restrict__ logits,
                                int S_q, int S_k, int clean_logits) {
    constexpr int N_TILES = H / 8;  // 8-head n-tiles
    __shared__ __align__(128) unsigned char k_tiles[STAGES][BLOCK_KV * HEAD_DIM];
    __shared__ float scale_tiles[STAGES][BLOCK_KV];
    __shared__ __align__(16) float w_rows[QUERIES_PER_CTA][H];  // w[i] of each warp's query

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    // heaviest (latest, longest-range) query blocks first: a better tail for causal ranges
    const int i0 = (gridDim.x - 1 - blockIdx.x) * QUERIES_PER_CTA;
    const int i = i0 + warp;
    const bool row_valid = i < S_q;

    // the union of the block's key ranges: [kv_begin, kv_end) = [min ks, max ke) over non-empty rows
    int kv_begin, kv_end;
    union_key_range(ks, ke, i0, min(i0 + QUERIES_PER_CTA, S_q), S_k, kv_begin, kv_end);
    const int n_tiles = (kv_end - kv_begin + BLOCK_KV - 1) / BLOCK_KV;

    // pipeline prologue: the first STAGES - 1 tiles in flight
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_tiles) load_key_tile(k_tiles[s], scale_tiles[s], k, k_scale, kv_begin, kv_end, s);
        cp_async_commit();
    }

    const int2 row_range = row_valid ? key_range(ks, ke, i, S_k) : make_int2(0, 0);  // clipped
    const int row_ks = row_range.x, row_ke = row_range.y;
    T* logits_row = logits + (size_t)(row_valid ? i : 0) * S_k;
    if (row_valid && clean_logits) {  // outside the block's range nobody else writes: -inf now
        fill_neg_inf(logits_row, 0, kv_begin, lane);
        fill_neg_inf(logits_row, kv_end, S_k, lane);
    }

    // B fragments: q[i] for all heads and the four 32-wide slices of D, held for the whole kernel
    unsigned q_frag[N_TILES][4][2];
    // w[i] to shared memory (registers are spent on q): read back as the float2 of heads 8nt+2t, +1
    for (int h = lane; h < H; h += 32) w_rows[warp][h] = row_valid ? weights[(size_t)i * H + h] : 0.f;
    __syncwarp();
    const float2* w_pairs = reinterpret_cast<const float2*>(w_rows[warp]);
    #pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt) {
        const unsigned char* q_head = q + ((size_t)(row_valid ? i : 0) * H + nt * 8 + g) * HEAD_DIM;
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            q_frag[nt][kk][0] = row_valid ? *reinterpret_cast<const unsigned*>(q_head + kk * 32 + 4 * t) : 0u;
            q_frag[nt][kk][1] = row_valid ? *reinterpret_cast<const unsigned*>(q_head + kk * 32 + 16 + 4 * t) : 0u;
        }
    }

    for (int tile = 0; tile < n_tiles; ++tile) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile `tile` is in shared memory, and every warp is done with tile - 1
        if (tile + STAGES - 1 < n_tiles)
            load_key_tile(k_tiles[(tile + STAGES - 1) % STAGES], scale_tiles[(tile + STAGES - 1) % STAGES], k,
                          k_scale, kv_begin, kv_end, tile + STAGES - 1);
        cp_async_commit();
        if (!row_valid) continue;

        const unsigned char* k_tile = k_tiles[tile % STAGES];
        const float* scale_tile = scale_tiles[tile % STAGES];
        const int tile_first = kv_begin + tile * BLOCK_KV;
        #pragma unroll 1
        for (int mt = 0; mt < BLOCK_KV / 16; ++mt) {
            const int key0 = tile_first + mt * 16;
            if (key0 >= kv_end) break;
            const int key_lo = key0 + g, key_hi = key0 + g + 8;  // the two rows of this lane
            if (key0 + 16 <= row_ks || key0 >= row_ke) {  // no visible key for this query: warp-uniform
                if (clean_logits && t < 2) {
                    const int key = t == 0 ? key_lo : key_hi;
                    if (key < kv_end) logits_row[key] = from_float<T>(NEG_INF);
                }
                continue;
            }
            // The H heads in groups of 32 (4 n-tiles of 8): 16 accumulators live at a time, so the q
            // fragments stay in registers; the key fragments are re-read from shared memory per group.
            float sum_lo = 0.f, sum_hi = 0.f;  // this lane's part of the head sum, keys g and g+8
            #pragma unroll
            for (int hg = 0; hg < N_TILES / 4; ++hg) {
                // scores[key, h] = k[key] . q[i, h] for 16 keys x 32 heads, float32 accumulators
                float acc[4][4];
                e4m3_key_scores(acc, k_tile, mt, q_frag, hg, lane);
                // sum_h w[i, h] * ReLU(scores[key, h]) over this lane's 2 heads of each n-tile
                #pragma unroll
                for (int n = 0; n < 4; ++n)  // w[i, 8nt+2t], w[i, 8nt+2t+1]
                    add_weighted_relu(acc[n][0], acc[n][1], acc[n][2], acc[n][3],
                                      ld_shared_f2(w_pairs + (4 * hg + n) * 4 + t), sum_lo, sum_hi);
            }
            // ... and over the 4 lanes (t = 0..3) that share a row
            sum_lo = quad_sum(sum_lo);
            sum_hi = quad_sum(sum_hi);
            // logits[i, key] = k_scale[key] * sum, or -inf outside [ks_i, ke_i); lane t = 0 stores
            // key g, lane t = 1 key g + 8
            if (t < 2) {
                const int key = t == 0 ? key_lo : key_hi;
                const float sum = t == 0 ? sum_lo : sum_hi;
                if (key < kv_end) {
                    const bool visible = key >= row_ks && key < row_ke;
                    if (visible) logits_row[key] = from_float<T>(sum * scale_tile[key - tile_first]);
                    else if (clean_logits) logits_row[key] = from_float<T>(NEG_INF);
                }
            }
        }
    }
    cp_async_wait<0>();  // leave no copy in flight into a shared memory that is about to go away
}

MQA_ENTRY(mqa_logits_e4m3_h64, mqa_logits_e4m3, 64, __maxnreg__(MAX_REGISTERS))
MQA_ENTRY(mqa_logits_e4m3_h32, mqa_logits_e4m3, 32, __maxnreg__(MAX_REGISTERS))

// ------------------------------------------------------------------------------------ kernel 3

// Hopper (sm_90) has no FP8 path for mma.sync: ptxas lowers m16n8k32 e4m3 into byte conversions of
// both operands followed by two f16 m16n8k16 mma, on every call. Kernel 3 does that conversion
// itself, where it is cheapest: q once per kernel (kept as f16 in registers), each key fragment once
// per warp and shared by 4 head tiles. Every e4m3 value is exactly an f16 value, so the products
// are the same; accumulation stays float32.

// The helpers, in cuda/common.cuh: e4m3x4_to_f16x4 turns four e4m3 bytes (one 32-bit register, little
// end first) into two f16x2 registers, lo = bytes 0, 1 and hi = bytes 2, 3; mma_f16_16816 is
// C[16 x 8] += A[16 x 16] * B[16 x 8], f16 inputs, float32 accumulation. Fragments (PTX ISA,
// mma.m16n8k16 .f16), lane = 4 g + t:
//   A a0: row g, k 2t, 2t+1   a1: row g+8, k 2t, 2t+1   a2: row g, k 2t+8, 2t+9   a3: row g+8, k 2t+8, 2t+9
//   B b0: col g, k 2t, 2t+1   b1: col g, k 2t+8, 2t+9
//   C as for m16n8k32 above.

// Which k is which: a dot product does not care in what order its D terms are summed, as long as
// A and B agree. In each 16-wide slice s of D, lane t takes the 4 bytes d = 16 s + 4t .. 4t+3 (what
// ldmatrix hands it from a key row) and calls d = 16s+4t, +1 "k = 2t, 2t+1" and d = 16s+4t+2, +3
// "k = 2t+8, 2t+9". q's B fragment is read with the same rule, so every product pairs q[d] with k[d].
// 8 warps a block and 2 blocks an SM (<= 128 registers, 44 KB of shared memory each): while one
// block waits at its per-tile barrier the other computes.
#define K3_WARPS 8                     // warps a block; 32 heads a warp
#define K3_BLOCKS_PER_SM 2
#define K3_THREADS (32 * K3_WARPS)
#define K3_HEADS_PER_WARP 32

template <int H, typename T>
__device__ void mqa_logits_f16(const unsigned char* __restrict__ q, const unsigned char* __restrict__ k,
                               const float* __restrict__ k_scale, const float* __restrict__ weights,
                               const int* __restrict__ ks, const int* __restrict__ ke, T* __restrict__ logits,
                               int S_q, int S_k, int clean_logits) {
    constexpr int HALVES = H / K3_HEADS_PER_WARP;    // warps a query: 2 for H = 64, 1 for H = 32
    constexpr int QUERIES = K3_WARPS / HALVES;       // queries a block: 4 or 8
    constexpr int N_TILES = K3_HEADS_PER_WARP / 8;   // 8-head n-tiles a warp: 4
    constexpr int K_STEPS = HEAD_DIM / 16;           // 16-wide slices of D: 8
    __shared__ __align__(128) unsigned char k_tiles[STAGES][BLOCK_KV * HEAD_DIM];
    __shared__ float scale_tiles[STAGES][BLOCK_KV];
    __shared__ __align__(16) float w_rows[K3_WARPS][K3_HEADS_PER_WARP];  // w[i, this warp's 32 heads]
    // partial[tile % 2][warp][key]: k_scale[key] * sum over this warp's heads, summed over the warps
    // of a query (the head halves) one tile later, after the barrier that starts the next tile
    __shared__ float partials[2][K3_WARPS][BLOCK_KV];

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int half = warp % HALVES, query = warp / HALVES;  // heads [32 half, 32 half + 32) of query i0 + query
    const int i0 = (gridDim.x - 1 - blockIdx.x) * QUERIES;  // heaviest (latest) query blocks first
    const int i = i0 + query;
    const bool row_valid = i < S_q;

    // the union of the block's key ranges, as in kernel 2
    int kv_begin, kv_end;
    union_key_range(ks, ke, i0, min(i0 + QUERIES, S_q), S_k, kv_begin, kv_end);
    const int n_tiles = (kv_end - kv_begin + BLOCK_KV - 1) / BLOCK_KV;

    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_tiles) load_key_tile<K3_THREADS>(k_tiles[s], scale_tiles[s], k, k_scale, kv_begin, kv_end, s);
        cp_async_commit();
    }

    const int2 row_range = row_valid ? key_range(ks, ke, i, S_k) : make_int2(0, 0);  // clipped
    const int row_ks = row_range.x, row_ke = row_range.y;
    T* logits_row = logits + (size_t)(row_valid ? i : 0) * S_k;
    if (row_valid && clean_logits) {  // outside the block's key range: -inf, the first half before, the last after
        if (half == 0) fill_neg_inf(logits_row, 0, kv_begin, lane);
        if (half == HALVES - 1) fill_neg_inf(logits_row, kv_end, S_k, lane);
    }

    // q[i, h] for this warp's 32 heads as f16 B fragments: q_frag[n][s] = (b0, b1) of head 32 half + 8n + g,
    // slice s of D; 64 registers, converted once
    unsigned q_frag[N_TILES][K_STEPS][2];
    #pragma unroll
    for (int n = 0; n < N_TILES; ++n) {
        const int head = half * K3_HEADS_PER_WARP + n * 8 + g;
        const unsigned char* q_head = q + ((size_t)(row_valid ? i : 0) * H + head) * HEAD_DIM;
        #pragma unroll
        for (int s = 0; s < K_STEPS; ++s) {
            const unsigned bytes = row_valid ? *reinterpret_cast<const unsigned*>(q_head + s * 16 + 4 * t) : 0u;
            e4m3x4_to_f16x4(bytes, q_frag[n][s][0], q_frag[n][s][1]);
        }
    }
    w_rows[warp][lane] = row_valid ? weights[(size_t)i * H + half * K3_HEADS_PER_WARP + lane] : 0.f;
    __syncwarp();
    const float2* w_pairs = reinterpret_cast<const float2*>(w_rows[warp]);

    // logits[i, key] for the keys of tile `done`: partial sums of the HALVES warps of query i; each warp
    // stores a disjoint half of the tile's 64 keys, one key a lane (coalesced)
    auto store_tile = [&](int done) {
        if (!row_valid) return;
        const float* parts = partials[done % 2][query * HALVES];
        for (int slot = half * 32 + lane; slot < BLOCK_KV; slot += 32 * HALVES) {
            const int key = kv_begin + done * BLOCK_KV + slot;
            if (key >= kv_end) break;
            if (key >= row_ks && key < row_ke) {  // visible: its m-tile was computed, its partials written
                // logits[i, key] = sum over the head halves of k_scale[key] * sum_h w[i, h] ReLU(q[i, h] . k[key])
                float logit = 0.f;
                #pragma unroll
                for (int h = 0; h < HALVES; ++h) logit += parts[h * BLOCK_KV + slot];
                logits_row[key] = from_float<T>(logit);
            } else if (clean_logits) {
                logits_row[key] = from_float<T>(NEG_INF);
            }
        }
    };

    for (int tile = 0; tile < n_tiles; ++tile) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile `tile` has landed; every warp is done with tile - 1 and its partials
        if (tile + STAGES - 1 < n_tiles)
            load_key_tile<K3_THREADS>(k_tiles[(tile + STAGES - 1) % STAGES], scale_tiles[(tile + STAGES - 1) % STAGES],
                                      k, k_scale, kv_begin, kv_end, tile + STAGES - 1);
        cp_async_commit();
        if (tile > 0) store_tile(tile - 1);
        if (!row_valid) continue;

        const unsigned char* k_tile = k_tiles[tile % STAGES];
        const float* scale_tile = scale_tiles[tile % STAGES];
        float* part = partials[tile % 2][warp];
        const int tile_first = kv_begin + tile * BLOCK_KV;
        #pragma unroll 1
        for (int mt = 0; mt < BLOCK_KV / 16; ++mt) {
            const int key0 = tile_first + mt * 16;
            if (key0 >= kv_end) break;
            if (key0 + 16 <= row_ks || key0 >= row_ke) continue;  // no visible key: store_tile writes -inf
            // scores[key, h] = k[key] . q[i, h] for 16 keys x 32 heads, float32 accumulators
            float acc[N_TILES][4];
            f16_key_scores(acc, k_tile, mt, q_frag, lane);
            // sum_h w[i, h] * ReLU(scores[key, h]) over this lane's 2 heads of each n-tile ...
            float sum_lo = 0.f, sum_hi = 0.f;  // keys g and g + 8
            #pragma unroll
            for (int n = 0; n < N_TILES; ++n)  // w[i, 8n+2t], w[i, 8n+2t+1] of this half
                add_weighted_relu(acc[n][0], acc[n][1], acc[n][2], acc[n][3], ld_shared_f2(w_pairs + n * 4 + t),
                                  sum_lo, sum_hi);
            // ... over the 4 lanes of a key row ...
            sum_lo = quad_sum(sum_lo);
            sum_hi = quad_sum(sum_hi);
            // ... times k_scale[key]; lane t = 0 keeps key g, lane t = 1 key g + 8
            if (t < 2) {
                const int slot = mt * 16 + g + 8 * t;
                part[slot] = (t == 0 ? sum_lo : sum_hi) * scale_tile[slot];
            }
        }
    }
    __syncthreads();  // the last tile's partials are complete
    if (n_tiles > 0) store_tile(n_tiles - 1);
    cp_async_wait<0>();
}

MQA_ENTRY(mqa_logits_f16_h64, mqa_logits_f16, 64, __launch_bounds__(K3_THREADS, K3_BLOCKS_PER_SM))

MQA_ENTRY(mqa_logits_f16_h32, mqa_logits_f16, 32, __launch_bounds__(K3_THREADS, K3_BLOCKS_PER_SM))

// ------------------------------------------------------------------------------------ kernel 4

// What holds kernel 3 back: mma.sync, even in f16, peaks near 360 TFLOP/s on the H200; Hopper's full
// tensor-core rate (about 4x that for FP8) is reached only through wgmma, the warpgroup-wide
// asynchronous mma that reads both operands from shared memory (cuda/wgmma.cuh). Kernel 4
// (mqa_logits_wgmma_h64 / _h32, sm_90a only) is kernel 2's data flow on wgmma, with the roles of
// DeepGEMM's sm90 fp8_mqa_logits:
// * a block is one warpgroup (128 threads) and owns QUERIES = 128 / H consecutive queries (2 for
//   H = 64), whose q rows (query, head) form the B tile: N = 128 rows of 128 bytes, copied once;
// * A is a tile of 64 keys, streamed through a K4_STAGES-deep cp.async ring in the same swizzled
//   layout as kernel 2 (which is exactly wgmma's 128-byte swizzle);
// * per key tile: 4 wgmma m64n128k32 (the 4 slices of D) give scores[64 keys][QUERIES x H] in 64
//   registers a thread (no conversion: the tensor cores take e4m3 directly), then the epilogue of
//   kernel 2 on them: ReLU, times w (shared memory), a sum over the thread's heads and over the 4
//   lanes of a row, times k_scale; lane t stores value t (+ 4) of its (query, row) pairs;
// * 4 blocks an SM (<= 128 registers, 51 KB of shared memory each): while one block runs its
//   epilogue, the others' wgmma keep the tensor cores busy.
// Bounds as in kernel 2: q rows past S_q are zero-filled and never stored; keys past kv_end are
// zero-filled and never stored; -inf outside [kv_begin, kv_end) when clean_logits.
#include "wgmma.cuh"  // WGMMA_AVAILABLE, wgmma_*, fence_*, weighted_relu_head_sums, sum_for_lane

#define K4_N 128                                   // B rows: 128 / H queries x H heads
#define K4_THREADS 128                             // one warpgroup
#define K4_STAGES 4
#define K4_BLOCKS_PER_SM 4
// dynamic shared memory, K4_SMEM_ALIGN-byte aligned inside (a 128-byte-swizzled wgmma tile starts on a
// 1024-byte boundary): q tile, K4_STAGES key tiles, their scales, w. The launch asks for
// K4_DYNAMIC_SMEM: the alignment slack (the kernel rounds its base up by at most that) + the carve.
#define K4_SMEM_ALIGN 1024
#define K4_SMEM_BYTES (K4_N * HEAD_DIM + K4_STAGES * BLOCK_KV * HEAD_DIM + K4_STAGES * BLOCK_KV * 4 + K4_N * 4)
#define K4_DYNAMIC_SMEM (K4_SMEM_ALIGN + K4_SMEM_BYTES)

template <int H, typename T>
__device__ void mqa_logits_wgmma(const unsigned char* __restrict__ q, const unsigned char* __restrict__ k,
                                 const float* __restrict__ k_scale, const float* __restrict__ weights,
                                 const int* __restrict__ ks, const int* __restrict__ ke, T* __restrict__ logits,
                                 int S_q, int S_k, int clean_logits) {
#if WGMMA_AVAILABLE
    constexpr int QUERIES = K4_N / H;  // 2 for H = 64, 4 for H = 32
    extern __shared__ unsigned char k4_smem_raw[];
    // K4_SMEM_ALIGN-byte aligned: q tile [K4_N][128], key tiles [K4_STAGES][64][128], scales [K4_STAGES][64], w [K4_N]
    unsigned char* q_tile = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<size_t>(k4_smem_raw) + K4_SMEM_ALIGN - 1) & ~size_t(K4_SMEM_ALIGN - 1));
    unsigned char* k_tiles = q_tile + K4_N * HEAD_DIM;
    float* scale_tiles = reinterpret_cast<float*>(k_tiles + K4_STAGES * BLOCK_KV * HEAD_DIM);
    float* w_s = scale_tiles + K4_STAGES * BLOCK_KV;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * QUERIES;  // heaviest (latest) query blocks first

    int kv_begin, kv_end;  // the union of the block's key ranges, as in kernel 2
    union_key_range(ks, ke, i0, min(i0 + QUERIES, S_q), S_k, kv_begin, kv_end);
    const int n_tiles = (kv_end - kv_begin + BLOCK_KV - 1) / BLOCK_KV;

    // the B tile: row n = (query i0 + n / H, head n % H) = q row i0 H + n (zeros past S_q), swizzled;
    // these copies join the first cp.async group, with key tile 0
    for (int c = threadIdx.x; c < K4_N * CHUNKS_PER_ROW; c += K4_THREADS) {
        const int row = c / CHUNKS_PER_ROW, chunk = c % CHUNKS_PER_ROW;
        const bool inside = i0 + row / H < S_q;
        cp_async_16(q_tile + swizzled(row, chunk), q + ((size_t)(inside ? i0 * H + row : 0)) * HEAD_DIM + chunk * 16,
                    inside ? 16 : 0);
    }
    for (int n = threadIdx.x; n < K4_N; n += K4_THREADS) w_s[n] = i0 + n / H < S_q ? weights[(size_t)i0 * H + n] : 0.f;
    for (int s = 0; s < K4_STAGES - 1; ++s) {
        if (s < n_tiles)
            load_key_tile<K4_THREADS>(k_tiles + s * BLOCK_KV * HEAD_DIM, scale_tiles + s * BLOCK_KV, k, k_scale,
                                      kv_begin, kv_end, s);
        cp_async_commit();
    }
    if (clean_logits && warp < QUERIES && i0 + warp < S_q) {  // outside the block's key range: -inf now
        T* row = logits + (size_t)(i0 + warp) * S_k;
        fill_neg_inf(row, 0, kv_begin, lane);
        fill_neg_inf(row, kv_end, S_k, lane);
    }

    // what this lane stores: value v = t + 4 m (m < QUERIES / 2) of its (query, row) pairs, v = 2 q + r
    constexpr int STORES = QUERIES / 2;
    int store_ks[STORES], store_ke[STORES];
    #pragma unroll
    for (int m = 0; m < STORES; ++m) {
        const int i = i0 + (t + 4 * m) / 2;
        const int2 range = i < S_q ? key_range(ks, ke, i, S_k) : make_int2(0, 0);  // clipped
        store_ks[m] = range.x;
        store_ke[m] = range.y;  // an empty range past S_q: nothing visible, nothing stored
    }
    const unsigned long long b_desc = wgmma_desc(smem_address(q_tile));
    const unsigned w_lane = smem_address(w_s + 2 * t);

    for (int tile = 0; tile < n_tiles; ++tile) {
        cp_async_wait<K4_STAGES - 2>();
        fence_proxy_async();  // this thread's copies of tile `tile` (and of q) -> visible to the tensor cores
        __syncthreads();      // ... everybody's; and everybody is done with tile - 1
        if (tile + K4_STAGES - 1 < n_tiles) {
            const int s = (tile + K4_STAGES - 1) % K4_STAGES;
            load_key_tile<K4_THREADS>(k_tiles + s * BLOCK_KV * HEAD_DIM, scale_tiles + s * BLOCK_KV, k, k_scale,
                                      kv_begin, kv_end, tile + K4_STAGES - 1);
        }
        cp_async_commit();

        // scores[key][(query, head)] = k[key] . q[query, head] for the 64 keys of the tile, 4 k-steps of 32
        const int stage = tile % K4_STAGES;
        const unsigned long long a_desc = wgmma_desc(smem_address(k_tiles + stage * BLOCK_KV * HEAD_DIM));
        float acc[K4_N / 2];
        wgmma_fence();
        #pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 32; ++kk) wgmma_m64n128k32_e4m3(acc, a_desc + 2 * kk, b_desc + 2 * kk, kk);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(acc);

        // sum_h w[i, h] ReLU(scores[key, (i, h)]) for this thread's rows 16 warp + g (+ 8), every query
        float sums[QUERIES][2];
        weighted_relu_head_sums<K4_N, H>(acc, w_lane, sums);

        const int tile_first = kv_begin + tile * BLOCK_KV;
        #pragma unroll
        for (int m = 0; m < STORES; ++m) {
            const int v = t + 4 * m, r = v % 2;
            const float sum = sum_for_lane(sums, v);
            const int i = i0 + v / 2;
            const int slot = 16 * warp + g + 8 * r, key = tile_first + slot;
            if (i < S_q && key < kv_end) {
                if (key >= store_ks[m] && key < store_ke[m])
                    logits[(size_t)i * S_k + key] = from_float<T>(sum * scale_tiles[stage * BLOCK_KV + slot]);
                else if (clean_logits)
                    logits[(size_t)i * S_k + key] = from_float<T>(NEG_INF);
            }
        }
    }
    cp_async_wait<0>();
#else
    __trap();  // wgmma needs sm_90a; dsa_tutorial never launches this kernel elsewhere
#endif
}

MQA_ENTRY(mqa_logits_wgmma_h64, mqa_logits_wgmma, 64, __launch_bounds__(K4_THREADS, K4_BLOCKS_PER_SM))

MQA_ENTRY(mqa_logits_wgmma_h32, mqa_logits_wgmma, 32, __launch_bounds__(K4_THREADS, K4_BLOCKS_PER_SM))

// ------------------------------------------------------------------------------------ kernel 5

// What holds kernel 4 back (H200: 0.64-0.79x DeepGEMM): a block of 2 queries (H = 64) streams its whole key
// range, so every key tile is read from L2 by S_q / 2 blocks, each thread issuing its share of the cp.async
// copies and then waiting on them, and all 128 threads stop at a barrier every tile. Kernel 5
// (mqa_logits_tma_h64 / _h32, sm_90a only) keeps kernel 4's math and epilogue and changes who moves the
// data, and how often:
//
// * TMA (the Tensor Memory Accelerator). One thread describes a whole tile copy in one instruction,
//     cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [map, {x, y}], [bar]
//   and a unit beside the SM does the rest: it reads the box of the 2-D tensor `map` at coordinates (x, y)
//   (here x = byte 0 of a row, y = the first row), writes it to shared memory at dst, swizzled the way the
//   map says, and counts the bytes on the mbarrier `bar`. The map (a CUtensorMap, 128 bytes) is made on
//   the host by the driver (cuTensorMapEncodeTiled: dsa_tutorial.kernels.tensor_map_2d) and passed by value
//   as a `const __grid_constant__` parameter. Three maps: k as [S_k rows][128 bytes] (box: 64 rows), q as
//   [S_q H rows][128 bytes] (box: 256 rows), both CU_TENSOR_MAP_SWIZZLE_128B: chunk c of row r lands at
//   chunk c ^ (r % 8), exactly the layout kernel 4's wgmma descriptors read; and the weights as
//   [S_q rows][H floats] (box: the block's queries, no swizzle). Rows past the tensor's end (keys >= S_k,
//   queries >= S_q) are never read: TMA writes zeros there. So no thread computes an address or a bound.
// * mbarrier with a transaction count. `mbarrier.arrive.expect_tx [bar], bytes` is the producer's one
//   arrival (the barrier counts 1) that also announces how many bytes the phase waits for; each TMA copy
//   naming the barrier counts its bytes down as they land (complete_tx). The phase completes when both
//   are done, and a consumer waiting on it (mbarrier.try_wait.parity, acquire) then sees the data.
// * A ring of K5_STAGES key tiles, each with two mbarriers: full[s] (above) and empty[s], on which each of
//   the 8 consumer warps arrives once the wgmma that read stage s have completed. The producer waits
//   empty[s] before refilling stage s; the consumers wait full[s] before reading it. Each wait names the
//   parity of the phase it needs (the ring's lap: stage s is used for the n-th time in phase n, parity
//   n & 1), so a party one lap behind cannot be mistaken for one on time. Two q buffers (q tiles and
//   weights of a block of queries) change hands the same way (q_full[2], q_empty[2]), so the producer loads
//   the next block's q while the consumers finish this one.
// * Warp specialisation. A block is 3 warpgroups (384 threads): warpgroup 2, the producer, of which one
//   thread issues every TMA copy (the other 3 warps leave at once), and warpgroups 0 and 1, the consumers.
//   Consumer w owns 256 / H queries (4 for H = 64, 8 for H = 32: B = 256 rows (query, head) of q), so a
//   block owns 2 x 256 / H consecutive queries and BOTH consumers use every key tile of the block's range:
//   each key is read from L2 once per 8 queries (H = 64), not once per 2 as in kernel 4.
// * setmaxnreg. The launch gives every thread the same registers (384 threads, one block an SM: at most
//   168); `setmaxnreg.dec.sync.aligned.u32 40` makes the producer warpgroup give most of them back and
//   `setmaxnreg.inc.sync.aligned.u32 232` makes each consumer warpgroup take them: 128 x (40 + 2 x 232) =
//   64512 <= 65536. A consumer holds 128 accumulators a thread (64 keys x 256 columns over 128 threads).
// * A persistent grid. One block an SM (grid = min(number of SMs, blocks of queries)); block b takes the
//   blocks of queries of rounds r = 0, 1, ...: position r G + b in even rounds and r G + G - 1 - b in odd
//   ones (a snake, G = gridDim.x), longest first (position p is query block n_blocks - 1 - p: in causal
//   prefill the latest queries see the most keys), so the work evens out across SMs. The producer and the
//   consumers walk the same sequence and compute the same key range per block of queries (the union of
//   its clipped ranges, kernel 2's union_key_range), so they agree on every tile without talking.
//
// A consumer, per key tile: 2 x 4 wgmma m64n128k32 (queries 0 .. 128 / H - 1 of its block, then the rest,
// kernel 4's instruction and descriptors), committed as two groups; wait for the first group, run kernel
// 4's epilogue on it (weighted_relu_head_sums, sum_for_lane; k_scale read from global memory a tile ahead
// of its use) while the second group still runs; wait for the second, release the stage
// (empty), epilogue of the second. While one consumer runs its epilogue the other's wgmma keep the tensor
// cores busy. A tile that holds no key any of the consumer's queries sees is not computed (its columns
// inside the block's range get -inf when clean_logits, as in kernel 4).
//
//   producer (1 thread)    q(b0) k0 k1 k2 .. k7 | wait empty[0] k8 | wait empty[1] k9 ...  q(b1) ...
//                               \  \  \  TMA: global -> shared, bytes counted on full[s]
//   consumer 0   wait q_full, wait full[0]: wgmma A|B, epilogue A, arrive empty[0], epilogue B | full[1] ...
//   consumer 1   wait q_full, wait full[0]:    wgmma A|B (queued behind consumer 0's), epilogues | ...
//   tensor cores [c0 k0][c1 k0][c0 k1][c1 k1] ...   (epilogues hidden behind the other consumer's wgmma)
//
// Shared memory (1024-byte aligned inside): q [2 buffers][2 consumers][256 rows][128 bytes] (128 KiB),
// keys [K5_STAGES][64][128] (64 KiB), w [2 buffers][2 x 256] floats, mbarriers q_full[2], q_empty[2],
// full[K5_STAGES], empty[K5_STAGES]: 201888 bytes with the alignment slack, one block an SM.
//
// Semantics and bounds are kernel 4's, for ANY ks and ke: every range is clipped (key_range); q rows
// and keys past the tensors are zeros written by TMA, never read; stores only to rows < S_q and keys <
// kv_end <= S_k; -inf outside [kv_begin, kv_end) of the block when clean_logits. TMA coordinates are
// int32: dsa_tutorial refuses S_q H >= 2^31 for this kernel, and needs q, k and weights 16-byte aligned.

#define K5_N 128                                      // B rows of one wgmma: 128 / H queries (kernel 4's N)
#define K5_CONSUMER_ROWS (2 * K5_N)                   // a consumer's q rows: 256 / H queries
#define K5_CONSUMERS 2
#define K5_THREADS (128 * (K5_CONSUMERS + 1))         // two consumer warpgroups, then the producer
#define K5_STAGES 8                                   // key tiles in the ring
#define K5_PRODUCER_REGS 40                           // setmaxnreg: the producer warpgroup's registers a thread
#define K5_CONSUMER_REGS 232                          // the consumers' (128 accumulators a thread)
#define K5_Q_TILE_BYTES (K5_CONSUMER_ROWS * HEAD_DIM)                 // one consumer's q: 32 KiB, one TMA box
#define K5_Q_BYTES (K5_CONSUMERS * K5_Q_TILE_BYTES)                   // a q buffer: 64 KiB
#define K5_K_BYTES (BLOCK_KV * HEAD_DIM)                              // a key tile: 8 KiB, one TMA box
#define K5_W_BYTES (K5_CONSUMERS * K5_CONSUMER_ROWS * 4)              // a buffer's weights: 2 KiB, one TMA box
#define K5_BARRIERS (4 + 2 * K5_STAGES)                               // q_full[2], q_empty[2], full[], empty[]
#define K5_SMEM_BYTES (2 * K5_Q_BYTES + K5_STAGES * K5_K_BYTES + 2 * K5_W_BYTES + 8 * K5_BARRIERS)
#define K5_DYNAMIC_SMEM (WGMMA_SMEM_ALIGN + K5_SMEM_BYTES)           // + the slack align_smem may skip
#define K5_EMPTY_ARRIVALS (4 * K5_CONSUMERS)          // one arrival a consumer warp
static_assert(K5_DYNAMIC_SMEM <= 232448, "227 KiB: the most shared memory a block may ask for on an H100 / H200");
static_assert(K5_PRODUCER_REGS + K5_CONSUMERS * K5_CONSUMER_REGS <= 3 * (65536 / K5_THREADS / 8 * 8),
              "setmaxnreg moves registers within the block's launch allocation: 384 threads x 168");
static_assert(K5_PRODUCER_REGS % 8 == 0 && K5_CONSUMER_REGS % 8 == 0, "setmaxnreg takes multiples of 8");
static_assert(K5_Q_BYTES % 1024 == 0 && K5_K_BYTES % 1024 == 0, "every swizzled tile starts 1024-byte aligned");

// Block of queries p of this block's sequence (the snake above), -1 past the end; n_blocks blocks of
// queries in all.
__device__ __forceinline__ int k5_query_block(int round, int n_blocks) {
    const int G = gridDim.x, b = blockIdx.x;
    const int position = round * G + (round % 2 ? G - 1 - b : b);
    return position < n_blocks ? n_blocks - 1 - position : -1;
}

// union_key_range of queries first .. last - 1 (at most 32), computed by a warp: lane l takes query
// first + l. Every lane gets [kv_begin, kv_end); [0, 0) when all ranges are empty.
__device__ __forceinline__ void warp_union_key_range(const int* ks, const int* ke, int first, int last, int S_k,
                                                     int lane, int& kv_begin, int& kv_end) {
    int lo = S_k, hi = 0;
    if (first + lane < last) {
        const int2 range = key_range(ks, ke, first + lane, S_k);
        if (range.x < range.y) lo = range.x, hi = range.y;
    }
    kv_begin = __reduce_min_sync(0xffffffffu, lo);
    kv_end = __reduce_max_sync(0xffffffffu, hi);
    if (kv_end <= kv_begin) kv_begin = kv_end = 0;
}

template <int H, typename T>
__device__ void mqa_logits_tma(const TensorMap& q_map, const TensorMap& k_map, const TensorMap& w_map,
                               const float* __restrict__ k_scale, const int* __restrict__ ks,
                               const int* __restrict__ ke, T* __restrict__ logits, int S_q, int S_k,
                               int clean_logits) {
#if WGMMA_AVAILABLE
    constexpr int QH = K5_N / H;                    // queries of one wgmma group: 2 (H = 64) or 4 (H = 32)
    constexpr int CONSUMER_QUERIES = 2 * QH;        // a consumer's queries
    constexpr int QUERIES = K5_CONSUMERS * CONSUMER_QUERIES;  // the block's queries a round: 8 or 16
    constexpr int STORES = QH / 2;                  // values a lane stores per group and key tile
    static_assert(QUERIES <= 32, "warp_union_key_range: one query a lane");
    extern __shared__ unsigned char k5_smem_raw[];
    unsigned char* q_s = align_smem(k5_smem_raw);                      // [2][K5_CONSUMERS][256][128]
    unsigned char* k_s = q_s + 2 * K5_Q_BYTES;                         // [K5_STAGES][64][128]
    float* w_s = reinterpret_cast<float*>(k_s + K5_STAGES * K5_K_BYTES);  // [2][K5_CONSUMERS * 256]
    const unsigned q_full = smem_address(w_s + 2 * K5_CONSUMERS * K5_CONSUMER_ROWS);  // 8 bytes each
    const unsigned q_empty = q_full + 2 * 8, full = q_full + 4 * 8, empty = full + K5_STAGES * 8;

    const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int n_blocks = (S_q + QUERIES - 1) / QUERIES;

    if (threadIdx.x == 0) {
        for (int b = 0; b < 2; ++b) {
            mbarrier_init(q_full + 8 * b, 1);                  // the producer's arrive.expect_tx (+ the bytes)
            mbarrier_init(q_empty + 8 * b, K5_EMPTY_ARRIVALS);
        }
        for (int s = 0; s < K5_STAGES; ++s) {
            mbarrier_init(full + 8 * s, 1);
            mbarrier_init(empty + 8 * s, K5_EMPTY_ARRIVALS);
        }
        fence_mbarrier_init();
    }
    __syncthreads();  // the barriers are initialised before anybody uses them (the last block-wide barrier)

    if (warpgroup == K5_CONSUMERS) {
        // ---------------------------------------------------------------- the producer
        setmaxnreg_dec<K5_PRODUCER_REGS>();
        if (warp != 0) return;  // one warp walks the sequence (its lanes compute the key ranges)
        if (lane == 0) {
            prefetch_tensor_map(q_map);
            prefetch_tensor_map(k_map);
            prefetch_tensor_map(w_map);
        }
        int stage = 0, lap = 0;  // the ring position: stage `stage` in its lap-th use
        for (int round = 0;; ++round) {
            const int qb = k5_query_block(round, n_blocks);
            if (qb < 0) break;
            const int i0 = qb * QUERIES;
            int kv_begin, kv_end;
            warp_union_key_range(ks, ke, i0, min(i0 + QUERIES, S_q), S_k, lane, kv_begin, kv_end);
            const int n_tiles = (kv_end - kv_begin + BLOCK_KV - 1) / BLOCK_KV;
            // q and w of this block of queries into buffer round % 2, once the consumers released it
            const int buffer = round % 2;
            mbarrier_wait(q_empty + 8 * buffer, ((round / 2) & 1) ^ 1);
            if (lane == 0) {
                // q rows i0 H + 256 c .. + 255 of consumer c (zeros past S_q H); none for a consumer whose
                // queries all lie past S_q (it computes nothing: its key range is empty)
                const int consumers = min(K5_CONSUMERS, (S_q - i0 + CONSUMER_QUERIES - 1) / CONSUMER_QUERIES);
                mbarrier_arrive_expect_tx(q_full + 8 * buffer, consumers * K5_Q_TILE_BYTES + K5_W_BYTES);
                for (int c = 0; c < consumers; ++c)
                    tma_load_2d(smem_address(q_s + buffer * K5_Q_BYTES + c * K5_Q_TILE_BYTES), q_map, 0,
                                i0 * H + c * K5_CONSUMER_ROWS, q_full + 8 * buffer);
                // w rows i0 .. i0 + QUERIES - 1 (zeros past S_q)
                tma_load_2d(smem_address(w_s + buffer * K5_CONSUMERS * K5_CONSUMER_ROWS), w_map, 0, i0,
                            q_full + 8 * buffer);
            }
            for (int tile = 0; tile < n_tiles; ++tile) {
                mbarrier_wait(empty + 8 * stage, (lap & 1) ^ 1);  // the consumers are done with its last use
                if (lane == 0) {
                    mbarrier_arrive_expect_tx(full + 8 * stage, K5_K_BYTES);
                    tma_load_2d(smem_address(k_s + stage * K5_K_BYTES), k_map, 0, kv_begin + tile * BLOCK_KV,
                                full + 8 * stage);
                }
                if (++stage == K5_STAGES) stage = 0, ++lap;
            }
            __syncwarp();
        }
        return;  // nothing waits for the producer; the consumers wait for every copy it issued
    }

    // -------------------------------------------------------------------- the consumers
    setmaxnreg_inc<K5_CONSUMER_REGS>();
    const int g = lane / 4, t = lane % 4;
    const int slot = 16 * warp + g + 8 * (t % 2);  // the key (row of the tile) of every value this lane stores
    int stage = 0, lap = 0;
    for (int round = 0;; ++round) {
        const int qb = k5_query_block(round, n_blocks);
        if (qb < 0) break;
        const int i0 = qb * QUERIES;
        const int c0 = i0 + warpgroup * CONSUMER_QUERIES;  // this consumer's first query
        int kv_begin, kv_end, own_begin, own_end;  // the block's union (the producer's tiles), this consumer's
        warp_union_key_range(ks, ke, i0, min(i0 + QUERIES, S_q), S_k, lane, kv_begin, kv_end);
        warp_union_key_range(ks, ke, c0, min(c0 + CONSUMER_QUERIES, S_q), S_k, lane, own_begin, own_end);
        const int n_tiles = (kv_end - kv_begin + BLOCK_KV - 1) / BLOCK_KV;

        // outside the block's key range nobody writes: -inf now (warp w: queries w, w + 4, ...)
        if (clean_logits)
            for (int qq = warp; qq < CONSUMER_QUERIES; qq += 4)
                if (c0 + qq < S_q) {
                    T* row = logits + (size_t)(c0 + qq) * S_k;
                    fill_neg_inf(row, 0, kv_begin, lane);
                    fill_neg_inf(row, kv_end, S_k, lane);
                }

        // what this lane stores, as in kernel 4: value v = t + 4 m of group j's (query, row) pairs, query
        // c0 + QH j + v / 2; its clipped range (empty past S_q: nothing visible, nothing stored)
        int store_ks[2][STORES], store_ke[2][STORES];
        #pragma unroll
        for (int j = 0; j < 2; ++j)
            #pragma unroll
            for (int m = 0; m < STORES; ++m) {
                const int i = c0 + QH * j + (t + 4 * m) / 2;
                const int2 range = i < S_q ? key_range(ks, ke, i, S_k) : make_int2(0, 0);
                store_ks[j][m] = range.x;
                store_ke[j][m] = range.y;
            }

        const int buffer = round % 2;
        const unsigned char* q_tile = q_s + buffer * K5_Q_BYTES + warpgroup * K5_Q_TILE_BYTES;
        const unsigned long long b_desc = wgmma_desc(smem_address(q_tile));  // group 1: + 128 rows = + 16 KiB
        const unsigned w_lane = smem_address(w_s + buffer * K5_CONSUMERS * K5_CONSUMER_ROWS +
                                             warpgroup * K5_CONSUMER_ROWS + 2 * t);
        // k_scale of this lane's key in the tile starting at tile_first (0 past kv_end: never stored), loaded
        // a tile ahead of its use so that its trip to L2 hides behind a tile of work
        auto key_scale = [&](int tile_first) {
            const int key = tile_first + slot;
            return key < kv_end ? __ldg(k_scale + key) : 0.f;
        };
        float scale = key_scale(kv_begin);
        mbarrier_wait(q_full + 8 * buffer, (round / 2) & 1);  // (acquire) q and w of this block have landed

        // logits[i, key] of group j from its head sums (or -inf where row i does not see the key)
        auto store = [&](int j, const float (&sums)[QH][2], int tile_first, float key_scale_value) {
            #pragma unroll
            for (int m = 0; m < STORES; ++m) {
                const int v = t + 4 * m;
                const int i = c0 + QH * j + v / 2;
                const int key = tile_first + slot;
                if (i < S_q && key < kv_end) {
                    if (key >= store_ks[j][m] && key < store_ke[j][m])
                        logits[(size_t)i * S_k + key] = from_float<T>(sum_for_lane(sums, v) * key_scale_value);
                    else if (clean_logits)
                        logits[(size_t)i * S_k + key] = from_float<T>(NEG_INF);
                }
            }
        };

        for (int tile = 0; tile < n_tiles; ++tile) {
            const int tile_first = kv_begin + tile * BLOCK_KV;
            mbarrier_wait(full + 8 * stage, lap & 1);  // (acquire) the key tile has landed
            const float next_scale = key_scale(tile_first + BLOCK_KV);
            float sums[QH][2];
            if (tile_first < own_end && tile_first + BLOCK_KV > own_begin) {
                // scores[key][(query, head)] for the 64 keys and this consumer's 256 columns: two groups of
                // 4 wgmma m64n128k32 (kernel 4's), the second running while the first one's epilogue does
                const unsigned long long a_desc = wgmma_desc(smem_address(k_s + stage * K5_K_BYTES));
                float acc[2][K5_N / 2];
                wgmma_fence();
                #pragma unroll
                for (int j = 0; j < 2; ++j) {
                    #pragma unroll
                    for (int kk = 0; kk < HEAD_DIM / 32; ++kk)
                        wgmma_m64n128k32_e4m3(acc[j], a_desc + 2 * kk, b_desc + j * (K5_N * HEAD_DIM >> 4) + 2 * kk,
                                              kk);
                    wgmma_commit();
                }
                wgmma_wait<1>();
                fence_operands(acc[0]);
                weighted_relu_head_sums<K5_N, H>(acc[0], w_lane, sums);
                store(0, sums, tile_first, scale);
                wgmma_wait<0>();
                fence_operands(acc[1]);
                __syncwarp();
                if (lane == 0) mbarrier_arrive(empty + 8 * stage);  // this warp's wgmma no longer read the stage
                weighted_relu_head_sums<K5_N, H>(acc[1], w_lane + 4 * K5_N, sums);
                store(1, sums, tile_first, scale);
            } else {
                // no key of the tile is visible to this consumer's queries: -inf where clean_logits
                __syncwarp();
                if (lane == 0) mbarrier_arrive(empty + 8 * stage);
                #pragma unroll
                for (int q = 0; q < QH; ++q) sums[q][0] = sums[q][1] = 0.f;
                store(0, sums, tile_first, 0.f);
                store(1, sums, tile_first, 0.f);
            }
            scale = next_scale;
            if (++stage == K5_STAGES) stage = 0, ++lap;
        }
        __syncwarp();
        if (lane == 0) mbarrier_arrive(q_empty + 8 * buffer);  // (release) q and w of this buffer are read
    }
#else
    __trap();  // wgmma, TMA and setmaxnreg need sm_90a; dsa_tutorial never launches this kernel elsewhere
#endif
}

// The entry points of kernel 5: the three tensor maps (q, k, w) by value, then kernel 4's other arguments.
#define TMA_ENTRY_T(NAME, H, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(K5_THREADS, 1)                                                  \
        NAME(const __grid_constant__ TensorMap q_map, const __grid_constant__ TensorMap k_map,                   \
             const __grid_constant__ TensorMap w_map, const float* k_scale, const int* ks, const int* ke,        \
             T* logits, int S_q, int S_k, int clean_logits) {                                                    \
        mqa_logits_tma<H, T>(q_map, k_map, w_map, k_scale, ks, ke, logits, S_q, S_k, clean_logits);              \
    }
TMA_ENTRY_T(mqa_logits_tma_h64_f32, 64, float)
TMA_ENTRY_T(mqa_logits_tma_h64_bf16, 64, __nv_bfloat16)
TMA_ENTRY_T(mqa_logits_tma_h32_f32, 32, float)
TMA_ENTRY_T(mqa_logits_tma_h32_bf16, 32, __nv_bfloat16)
