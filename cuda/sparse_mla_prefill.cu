// Sparse MLA attention for PREFILL, equation 2 over a whole prompt: u_t = Attn(h_t, { c_s : s in S_t })
//
// The operation FlashMLA's sparse prefill (flash_mla_sparse_fwd) computes: T query tokens, each with
// its own selection of k latents out of ONE latent cache of S tokens (the prompt's own, causality
// already in the indices). Checked against dsa_tutorial.sparse_prefill.sparse_mla_prefill (float32);
// launched by sparse_mla_prefill_cuda (its table SPARSE_MLA_PREFILL_KERNELS).
//
//   q          bfloat16 [T, h, 576]   per head: the absorbed query (512 values) then its rotary part (64)
//   kv         bfloat16 [S, 576]      the latent cache [c_kv (512) | k_rope (64)] (FlashMLA: [S, 1, 576])
//   indices    int32    [T, k]        token t attends to kv[indices[t, j]]; -1 (or anything outside
//                                     [0, S)) = an unused slot, never read, whatever its value
//   out        bfloat16 [T, h, 512]   sum_j p_j c_kv[s_j], rounded to bf16 once, at the end
//   max_logits float32  [T, h]        max_j score_j                      (-inf when nothing is selected)
//   lse        float32  [T, h]        ln sum_j exp(score_j), natural log (+inf when nothing is selected)
//
//   score_j = softmax_scale * (q . kv[s_j])   over all 576 values      p_j = exp(score_j - lse)
//
// A row with no valid index gets out = 0, max_logits = -inf, lse = +inf (FlashMLA's conventions).
// h is 64 or 128: a block serves 64 heads of one token, so the grid is T * h / 64 blocks on ONE
// dimension (grid.x takes up to 2^31 - 1; T may exceed 65535).
//
//   kernel 1  sparse_mla_prefill_mma    tensor cores, mma.sync m16n8k16 bf16 with float32 accumulation:
//             the decode kernel of cuda/sparse_mla_attention.cu (kernel 2) with one cache for all
//             tokens. A block serves 64 heads of one token with 8 warps and walks its k selected
//             latents in tiles of 64, gathering the next tile (cp.async, zeros for unused slots) while
//             it computes on the current one. Warp w owns head tile mt = w % 4 and half = w / 4, which
//             picks its 32 of the tile's 64 keys for the scores and its 256 of the 512 output values:
//               1. S = Q K^T for its 16 heads x 32 keys (36 k-steps of 16; ldmatrix from swizzled rows),
//               2. row maxima swapped with the partner warp (same heads, other keys) through shared
//                  memory, so both apply the same running max to the online softmax,
//               3. P = exp(S - m) written in bf16 to shared memory; the row sums add the float32 values,
//               4. the whole 16 x 64 P read back as A fragments: O += P V into its 16 x 256 float32
//                  accumulators (V = the first 512 values of the same latents, ldmatrix.trans).
//             Shared memory: Q 72 KiB + 2 stages x 72 KiB + P 8 KiB + 1 KiB = 225 KiB, one block an SM.
//             Its limit is shared-memory bandwidth: ~176 ldmatrix.x4 per warp per tile for 272 mma.
//
//   kernel 2  sparse_mla_prefill_wgmma  Hopper's warpgroup mma (sm_90a only: a trap elsewhere, never
//             launched there). Two warpgroups, 64 heads of one token, tiles of 64 latents, two stages:
//               1. warpgroup w: S_w = Q K_w^T for the 64 heads x ITS 32 keys of the tile: 36
//                  wgmma m64n32k16 with both operands in shared memory (Q and the keys, K-major),
//               2. row maxima swapped between the warpgroups (one barrier), same running max in both,
//               3. P_w = exp(S_w - m) in bf16 into its 32 columns of a shared 64 x 64 P tile,
//               4. warpgroup w: O_w += P V[:, 256 w .. 256 w + 255] over all 64 keys: 4 wgmma
//                  m64n256k16, P K-major and V (the same latent tile) read N-major (transposed).
//             O_w is 64 x 256 float32: 128 registers a thread; S_w 16. Shared memory as kernel 1.
//             What it leaves on the table (FlashMLA does these): the two warpgroups run in lockstep, so
//             the tensor cores wait while both do their softmax (FlashMLA staggers its two warpgroups
//             and gives the gather to a third); with N = 32 each warpgroup reads all of Q for its half of
//             the keys (Q is read twice a tile); P goes through shared memory even for the warpgroup
//             that computed it (wgmma's register-A form would spare that read).
//             The default where it runs (compute capability 9.0).
//
// Precision (both): scores are exact bf16 products summed in float32; p is rounded to bf16 for P V
// (as FlashMLA does), the row sums add the unrounded float32 p, so lse is float32-accurate and out
// is within ~1e-3 of max|out| of the float32 reference.
//
// Bounds, for ANY index value: a slot is used only when 0 <= s < S; an unused slot copies nothing
// (16 zero bytes, cp.async with src_bytes = 0, from the in-bounds row 0 address), its score is -inf
// and its p exactly 0. Slots past k in the last (ragged) tile count as unused. The host never
// launches with T = 0, h = 0, k = 0 or S = 0 (it writes the empty rows itself); every address is
// computed in size_t.
#include <cuda_bf16.h>

#include "common.cuh"  // NEG_INF, smem_address, cp_async_*, ldmatrix_x4 (and _trans), mma_bf16_16816_free, quad_sum
#include "wgmma.cuh"   // WGMMA_AVAILABLE, wgmma_desc (and _n_major), blocked, the bf16 wgmma, fences, ...

#define D_C 512                  // kv_lora_rank: the latent c_kv, and d_v
#define D_R 64                   // qk_rope_head_dim: the shared rotary key k_rope
#define D_L (D_C + D_R)          // 576 values per cached token and per query head
#define PREFILL_HEADS 64         // heads a block (h = 64: one block a token; h = 128: two)
#define PREFILL_TILE 64          // selected latents per shared-memory stage
#define L_CHUNKS (D_L / 8)       // 72 chunks of 16 bytes in a 576-value row
#define COPY_PARTS 4             // threads copying one row (of Q, of a tile): 18 chunks each
#define POS_INF __int_as_float(0x7f800000)
#define LN2 0.6931471805599453f  // ln 2: a log2-domain value times LN2 is in natural units
#define LOG2E 1.4426950408889634f

// ------------------------------------------------------------------------------------ kernel 1
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16), lane = 4 g + t:
//   A (16 x 16, row-major)  a0: (row g, k 2t, 2t+1)  a1: (row g + 8, k 2t, 2t+1)
//                           a2: (row g, k 2t+8, +9)  a3: (row g + 8, k 2t+8, +9)
//   B (16 x 8, "col")       b0: (k 2t, 2t+1, col g)  b1: (k 2t+8, 2t+9, col g)
//   C (16 x 8, float32)     c0, c1: (row g, col 2t, 2t+1)  c2, c3: (row g + 8, col 2t, 2t+1)
// ldmatrix.x4 hands register i the 8x8 matrix whose 8 row addresses lanes 8i .. 8i+7 give; without
// .trans lane 4g + t gets (row g, columns 2t, 2t+1) of it, with .trans (rows 2t, 2t+1, column g).
// Shared rows are 16-byte chunks; chunk c of row r sits at position c ^ (r % 8) (an XOR swizzle).

#define MMA_THREADS 256          // 8 warps: 4 head tiles x 2 halves
#define P_CHUNKS (PREFILL_TILE / 8)
// Both kernels' shared memory (kernel 2 carves the same sizes): Q [64][576] and 2 stages of latents
// [64][576] bf16 (72 KiB each), P [64][64] bf16 (8 KiB), the row exchange [2][64] f32, the valid flags
// [2][64] i32: 225 KiB, one block an SM
#define TILE_BYTES (PREFILL_TILE * D_L * 2)  // a stage of latents, or Q (as many rows: see the static_assert)
#define P_BYTES (PREFILL_HEADS * PREFILL_TILE * 2)
#define EXCHANGE_BYTES (2 * PREFILL_HEADS * 4 + 2 * PREFILL_TILE * 4)
#define MMA_SMEM_BYTES (3 * TILE_BYTES + P_BYTES + EXCHANGE_BYTES)
static_assert(PREFILL_HEADS == PREFILL_TILE, "Q takes one tile's room, P is square");

// bf16 offset of chunk `chunk` of row `row` in a swizzled array of `chunks` chunks a row
__device__ __forceinline__ int swizzled(int row, int chunk, int chunks) {
    return (row * chunks + (chunk ^ (row & 7))) * 8;
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
sparse_mla_prefill_mma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                       const int* __restrict__ indices, __nv_bfloat16* __restrict__ out,
                       float* __restrict__ max_logits, float* __restrict__ lse, int S, int n_h, int K,
                       float softmax_scale) {
    extern __shared__ __align__(16) unsigned char prefill_smem[];
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(prefill_smem);  // [64][576], swizzled
    __nv_bfloat16* kv_s = q_s + PREFILL_HEADS * D_L;                        // [2][64][576], swizzled
    __nv_bfloat16* p_s = kv_s + 2 * PREFILL_TILE * D_L;                     // [64][64], swizzled
    float* row_s = reinterpret_cast<float*>(p_s + PREFILL_HEADS * PREFILL_TILE);  // [2 halves][64]
    int* valid_s = reinterpret_cast<int*>(row_s + 2 * PREFILL_HEADS);             // [2 stages][64]

    const int groups = n_h / PREFILL_HEADS;  // 1 or 2 blocks a token
    const int token = blockIdx.x / groups, h0 = (blockIdx.x % groups) * PREFILL_HEADS;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int mt = warp % 4, half = warp / 4;  // head tile (heads h0 + 16 mt ..) and key / output half
    const int g = lane / 4, t = lane % 4;      // the fragment coordinates of this lane
    const int row = tid / COPY_PARTS, part = tid % COPY_PARTS;  // the row this thread helps copy
    const int* index_row = indices + (size_t)token * K;

    // the block's 64 query rows (this thread: chunks 4 j + part of row `row`)
    {
        const __nv_bfloat16* src = q + ((size_t)token * n_h + h0 + row) * D_L;
#pragma unroll
        for (int j = 0; j < L_CHUNKS / COPY_PARTS; ++j) {
            const int c = COPY_PARTS * j + part;
            cp_async_16(q_s + swizzled(row, c, L_CHUNKS), src + 8 * c, 16);
        }
    }
    // gather tile `tile` of the selection into stage `stage`: kv[s] for used slots, zeros otherwise
    auto load_tile = [&](int tile, int stage) {
        const int slot = tile * PREFILL_TILE + row;
        const int s = slot < K ? __ldg(index_row + slot) : -1;
        const bool used = s >= 0 && s < S;  // anything else is an unused slot: never read
        const __nv_bfloat16* src = kv + (size_t)(used ? s : 0) * D_L;
        __nv_bfloat16* dst = kv_s + stage * PREFILL_TILE * D_L;
#pragma unroll
        for (int j = 0; j < L_CHUNKS / COPY_PARTS; ++j) {
            const int c = COPY_PARTS * j + part;
            cp_async_16(dst + swizzled(row, c, L_CHUNKS), src + 8 * c, used ? 16 : 0);
        }
        if (part == 0) valid_s[stage * PREFILL_TILE + row] = used;
    };

    // this warp's output: heads 16 mt + g (c0, c1) and + 8 (c2, c3), values 256 half + 8 n + 2t, +1
    float o[32][4];
#pragma unroll
    for (int n = 0; n < 32; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    // running max and (this lane's partial) sum of rows g and g + 8, in the base-2 domain
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};
    const float scale_log2 = softmax_scale * LOG2E;  // exp(x) = 2^(x log2 e)

    const int n_tiles = (K + PREFILL_TILE - 1) / PREFILL_TILE;
    load_tile(0, 0);
    cp_async_commit();  // the queries and tile 0
    for (int tile = 0; tile < n_tiles; ++tile) {
        const int stage = tile % 2;
        cp_async_wait<0>();
        __syncthreads();  // (A) tile `tile` is in shared memory; every warp is done with tile - 1
        if (tile + 1 < n_tiles) load_tile(tile + 1, stage ^ 1);  // overlaps with the math below
        cp_async_commit();
        const __nv_bfloat16* k_tile = kv_s + stage * PREFILL_TILE * D_L;

        // 1. score = Q K^T for heads 16 mt .. +16, keys 32 half .. +32 of the tile: [16, 32]
        float acc[4][4];
#pragma unroll
        for (int n = 0; n < 4; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll 2
        for (int kk = 0; kk < D_L / 16; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a, q_s + swizzled(16 * mt + lane % 16, 2 * kk + lane / 16, L_CHUNKS));
#pragma unroll
            for (int np = 0; np < 2; ++np) {  // two n-tiles of 8 keys per ldmatrix
                unsigned kb[4];
                ldmatrix_x4(kb, k_tile + swizzled(32 * half + 16 * np + lane % 8 + 8 * (lane / 16),
                                                  2 * kk + (lane / 8) % 2, L_CHUNKS));
                mma_bf16_16816_free(acc[2 * np], a, kb[0], kb[1]);
                mma_bf16_16816_free(acc[2 * np + 1], a, kb[2], kb[3]);
            }
        }
        // score_s,i = softmax_scale (q_i . kv_s) times log2 e, -inf for unused slots; row maxima
        const int* valid = valid_s + stage * PREFILL_TILE + 32 * half;
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[n][e] = valid[8 * n + 2 * t + e % 2] ? acc[n][e] * scale_log2 : NEG_INF;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], acc[n][e]);
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad hold one row
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        }
        if (t == 0) {
            row_s[half * PREFILL_HEADS + 16 * mt + g] = tile_max[0];
            row_s[half * PREFILL_HEADS + 16 * mt + g + 8] = tile_max[1];
        }
        __syncthreads();  // (B) both halves' maxima are in row_s

        // 2. m_new = max(m_old, max over all 64 keys); the partner warp computes the same value
        float m_use[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float other = row_s[(half ^ 1) * PREFILL_HEADS + 16 * mt + g + 8 * r];
            const float new_max = fmaxf(row_max[r], fmaxf(tile_max[r], other));
            m_use[r] = new_max == NEG_INF ? 0.f : new_max;  // nothing valid yet: p = 0, not NaN
            alpha[r] = exp2f(row_max[r] - m_use[r]);      // exp(m_old - m_new): 0 the first time
            row_max[r] = new_max;
            row_sum[r] *= alpha[r];
        }
        // 3. p_s,i = exp(score - m_new): the sums add the float32 values, P V takes them rounded to bf16
#pragma unroll
        for (int n = 0; n < 4; ++n) {
            const float p0 = exp2f(acc[n][0] - m_use[0]), p1 = exp2f(acc[n][1] - m_use[0]);
            const float p2 = exp2f(acc[n][2] - m_use[1]), p3 = exp2f(acc[n][3] - m_use[1]);
            row_sum[0] += p0 + p1;
            row_sum[1] += p2 + p3;
            const int head = 16 * mt + g, chunk = 4 * half + n;  // keys 32 half + 8 n + 2t, +1
            *reinterpret_cast<__nv_bfloat162*>(p_s + swizzled(head, chunk, P_CHUNKS) + 2 * t) =
                __floats2bfloat162_rn(p0, p1);
            *reinterpret_cast<__nv_bfloat162*>(p_s + swizzled(head + 8, chunk, P_CHUNKS) + 2 * t) =
                __floats2bfloat162_rn(p2, p3);
        }
        // rescale what was accumulated under the old max (skipped, warp by warp, where it is 1 for all
        // rows: multiplying by 1 changes nothing)
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
            for (int n = 0; n < 32; ++n) {
                o[n][0] *= alpha[0];
                o[n][1] *= alpha[0];
                o[n][2] *= alpha[1];
                o[n][3] *= alpha[1];
            }
        }
        __syncthreads();  // (C) the whole 64 x 64 P is in p_s

        // 4. o += P V: [16, 64] x [64, 256], V = c_kv of the tile's latents, values 256 half ..
#pragma unroll
        for (int kk = 0; kk < PREFILL_TILE / 16; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a, p_s + swizzled(16 * mt + lane % 16, 2 * kk + lane / 16, P_CHUNKS));
#pragma unroll
            for (int np = 0; np < 16; ++np) {  // two n-tiles of 8 output values per ldmatrix
                unsigned vb[4];
                ldmatrix_x4_trans(vb, k_tile + swizzled(16 * kk + lane % 8 + 8 * ((lane / 8) % 2),
                                                        32 * half + 2 * np + lane / 16, L_CHUNKS));
                mma_bf16_16816_free(o[2 * np], a, vb[0], vb[1]);
                mma_bf16_16816_free(o[2 * np + 1], a, vb[2], vb[3]);
            }
        }
    }
    cp_async_wait<0>();  // only empty groups can be left, but leave nothing in flight

    // sum_s p_s over all 64 keys of every tile: the quad's lanes, then the partner warp's
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = quad_sum(row_sum[r]);
    __syncthreads();  // every warp has read the last tile's maxima from row_s
    if (t == 0) {
        row_s[half * PREFILL_HEADS + 16 * mt + g] = row_sum[0];
        row_s[half * PREFILL_HEADS + 16 * mt + g + 8] = row_sum[1];
    }
    __syncthreads();
    // out = o / sum_s p_s (0 when nothing was selected), max_logits = m ln 2, lse = ln(sum) + m ln 2
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int head = 16 * mt + g + 8 * r;
        const float total = row_sum[r] + row_s[(half ^ 1) * PREFILL_HEADS + head];  // the same in both
        const float inv_sum = total > 0.f ? 1.f / total : 0.f;
        const size_t head_row = (size_t)token * n_h + h0 + head;
        __nv_bfloat16* out_row = out + head_row * D_C + 256 * half + 2 * t;
#pragma unroll
        for (int n = 0; n < 32; ++n)
            *reinterpret_cast<__nv_bfloat162*>(out_row + 8 * n) =
                __floats2bfloat162_rn(o[n][2 * r] * inv_sum, o[n][2 * r + 1] * inv_sum);
        if (half == 0 && t == 0) {
            max_logits[head_row] = total > 0.f ? row_max[r] * LN2 : NEG_INF;
            lse[head_row] = total > 0.f ? logf(total) + row_max[r] * LN2 : POS_INF;
        }
    }
}

// ------------------------------------------------------------------------------------ kernel 2
//
// What holds kernel 1 back is mma.sync itself: every operand passes through registers (ldmatrix),
// and shared-memory bandwidth runs out before the tensor cores do. wgmma (sm_90a) reads both
// operands of a 64-row product straight from shared memory, issued once per warpgroup.
//
// Tiles in shared memory (Q, and each stage of latents): 64 rows of 576 bf16, cut into 9 column
// blocks of 64 values (128 bytes a row). Block b holds values 64 b .. 64 b + 63 of all 64 rows,
// 8 KiB, rows 128 bytes apart, with wgmma's 128-byte swizzle: the 16-byte chunk c (0..7) of row r
// sits at chunk position c ^ (r % 8). Every block starts 1024-byte aligned, so each 8-row group is one
// swizzle atom whose XOR pattern starts on a 1024-byte boundary (descriptor base offset 0).
//
// Descriptors (PTX ISA, "Matrix Descriptor Format" and the canonical layouts, T = 8 bf16 = 16 bytes):
// * K-major (Q as A, the keys as B in S = Q K^T; P as A in O += P V): rows of the operand are rows of
//   the tile, k runs along them. Canonical 128B-swizzle K-major layout ((8, m), (T, 2k)) :
//   ((8T, SBO), (1, T)): 8 rows of 128 bytes, then the next 8 rows SBO = 1024 bytes on; LBO unused (1).
//   A k-step of 16 bf16 is 32 bytes: k-step s (of 36) is block s / 4, bytes 32 (s % 4) .. of each row,
//   i.e. the start address moved by 8192 (s / 4) + 32 (s % 4). Inside a 128-byte row the move leaves
//   address bits 7..9 (the row in the atom) alone, and the hardware XORs bits 4..6 of the address it
//   forms with them: the swizzled chunk 2 (s % 4) + k / 8 of row r is where the copy put it. (This is
//   the e4m3 arithmetic of cuda/wgmma.cuh: a k-step of 32 e4m3 is 32 bytes too.)
// * N-major (V as B in O += P V, imm-trans-b = 1): the same latent tile, read transposed. B is
//   [K = 16 keys x N = 256 values]; in memory a key is a row and the values run along it, so N is the
//   contiguous dimension. Canonical 128B-swizzle MN-major layout ((T, 8, m), (8, k)) :
//   ((1, T, LBO), (8T, SBO)): 64 N-contiguous values in a 128-byte row, 8 rows (8 keys) 128 bytes
//   apart form the atom, the next 64 values LBO on, the next 8 keys SBO on. In our tile the next 64
//   values are the next column block: LBO = 8192; the next 8 keys the next 8 rows: SBO = 1024.
//   k-step kk (keys 16 kk ..) starts 16 kk rows = 2048 kk bytes on, a whole number of atoms; warpgroup
//   w's 256 values start at block 4 w. The atoms are the very bytes of the K-major view: one copy of
//   the latents serves Q K^T and P V (FlashMLA's sparse prefill reads its V the same way: its K tile
//   layout, transposed).
// The P tile [64 heads][64 keys] bf16 is one such block (8 KiB): warpgroup w writes its 32 key columns
// (chunks 4 w .. 4 w + 3) from its S accumulators, and both read all of it as A (K-major).
//
// Accumulators (PTX ISA, wgmma .m64nNk16 D fragment; as in cuda/wgmma.cuh): thread (warp w of the
// warpgroup, lane 4 g + t) holds d[4c + 0, 1] = (row 16 w + g, columns 8c + 2t, +1) and d[4c + 2, 3]
// = (row 16 w + g + 8, same columns), c < N / 8.
//
// Ordering: cp.async and st.shared write through the generic proxy, wgmma reads through the async
// proxy: each writer waits for its copies, fences (fence.proxy.async), then a barrier precedes the
// wgmma. A stage, and P, are overwritten only after every warpgroup has waited for (wgmma_wait<0>)
// the products that read them and passed a barrier.

#define WGMMA_THREADS 256                          // two warpgroups
// WGMMA_BLOCK_BYTES (a 64-value column block of a 64-row tile, 8 KiB) and WGMMA_SMEM_ALIGN (1024: swizzle
// atoms start on 1024-byte boundaries) come from cuda/wgmma.cuh, with blocked(), the descriptors and the
// bf16 wgmma wrappers this kernel uses
static_assert(PREFILL_TILE * 128 == WGMMA_BLOCK_BYTES, "a column block holds 64 rows of the tile");
// what the launch asks for: kernel 1's carve plus the slack to round the base up to WGMMA_SMEM_ALIGN
#define WGMMA_DYNAMIC_SMEM (WGMMA_SMEM_ALIGN + MMA_SMEM_BYTES)


extern "C" __global__ void __launch_bounds__(WGMMA_THREADS, 1)
sparse_mla_prefill_wgmma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                         const int* __restrict__ indices, __nv_bfloat16* __restrict__ out,
                         float* __restrict__ max_logits, float* __restrict__ lse, int S, int n_h, int K,
                         float softmax_scale) {
#if WGMMA_AVAILABLE
    extern __shared__ unsigned char wgmma_smem_raw[];
    // WGMMA_SMEM_ALIGN-byte aligned: Q, stages 0 and 1 (72 KiB each, 9 column blocks), P (8 KiB), the
    // row exchange, the flags
    unsigned char* q_s = align_smem(wgmma_smem_raw);
    unsigned char* kv_s = q_s + TILE_BYTES;
    unsigned char* p_s = kv_s + 2 * TILE_BYTES;
    float* row_s = reinterpret_cast<float*>(p_s + P_BYTES);            // [2 warpgroups][64]
    int* valid_s = reinterpret_cast<int*>(row_s + 2 * PREFILL_HEADS);  // [2 stages][64]

    const int groups = n_h / PREFILL_HEADS;
    const int token = blockIdx.x / groups, h0 = (blockIdx.x % groups) * PREFILL_HEADS;
    const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int row = tid / COPY_PARTS, part = tid % COPY_PARTS;  // the row this thread helps copy
    const int* index_row = indices + (size_t)token * K;

    {  // the block's 64 query rows, into the column-blocked layout
        const __nv_bfloat16* src = q + ((size_t)token * n_h + h0 + row) * D_L;
#pragma unroll
        for (int j = 0; j < L_CHUNKS / COPY_PARTS; ++j) {
            const int c = COPY_PARTS * j + part;
            cp_async_16(q_s + blocked(row, c), src + 8 * c, 16);
        }
    }
    auto load_tile = [&](int tile, int stage) {  // kv[s] for used slots, zeros otherwise
        const int slot = tile * PREFILL_TILE + row;
        const int s = slot < K ? __ldg(index_row + slot) : -1;
        const bool used = s >= 0 && s < S;  // anything else is an unused slot: never read
        const __nv_bfloat16* src = kv + (size_t)(used ? s : 0) * D_L;
        unsigned char* dst = kv_s + stage * TILE_BYTES;
#pragma unroll
        for (int j = 0; j < L_CHUNKS / COPY_PARTS; ++j) {
            const int c = COPY_PARTS * j + part;
            cp_async_16(dst + blocked(row, c), src + 8 * c, used ? 16 : 0);
        }
        if (part == 0) valid_s[stage * PREFILL_TILE + row] = used;
    };

    // this thread's output: heads 16 warp + g (o[4c], o[4c + 1]) and + 8 (o[4c + 2, 3]), values
    // 256 wg + 8c + 2t, +1 (c < 32)
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};  // base-2 domain, this thread's part
    const float scale_log2 = softmax_scale * LOG2E;
    const unsigned q_address = smem_address(q_s), kv_address = smem_address(kv_s);
    const unsigned p_address = smem_address(p_s);

    const int n_tiles = (K + PREFILL_TILE - 1) / PREFILL_TILE;
    load_tile(0, 0);
    cp_async_commit();  // the queries and tile 0
    for (int tile = 0; tile < n_tiles; ++tile) {
        const int stage = tile % 2;
        cp_async_wait<0>();
        fence_proxy_async();  // this thread's copies -> visible to the tensor cores' reads
        __syncthreads();      // (A) ... everybody's; every warpgroup is done with tile - 1 (and with P)
        if (tile + 1 < n_tiles) load_tile(tile + 1, stage ^ 1);  // overlaps with the math below
        cp_async_commit();
        const unsigned stage_address = kv_address + stage * TILE_BYTES;

        // 1. S_wg = Q K^T for the 64 heads x keys 32 wg .. 32 wg + 31 of the tile: 36 k-steps of 16
        float acc[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[i] = 0.f;
        const unsigned keys_address = stage_address + 32 * wg * 128;  // row 32 wg: 4 whole atoms on
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < D_L / 16; ++s) {
            const unsigned step = (s / 4) * WGMMA_BLOCK_BYTES + (s % 4) * 32;
            wgmma_m64n32k16_bf16(acc, wgmma_desc(q_address + step), wgmma_desc(keys_address + step), s);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(acc);

        // score (times log2 e), -inf for unused slots; this warpgroup's row maxima over its 32 keys
        const int* valid = valid_s + stage * PREFILL_TILE + 32 * wg;
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int i = 0; i < 16; ++i) {  // acc[i]: head 16 warp + g + 8 (i / 2 % 2), key 8 (i / 4) + 2t + i%2
            acc[i] = valid[8 * (i / 4) + 2 * t + i % 2] ? acc[i] * scale_log2 : NEG_INF;
            tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], acc[i]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad hold one row
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        }
        if (t == 0) {
            row_s[wg * PREFILL_HEADS + 16 * warp + g] = tile_max[0];
            row_s[wg * PREFILL_HEADS + 16 * warp + g + 8] = tile_max[1];
        }
        __syncthreads();  // (B) both warpgroups' maxima are in row_s

        // 2. m_new = max(m_old, max over all 64 keys): the same value in both warpgroups
        float m_use[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float other = row_s[(wg ^ 1) * PREFILL_HEADS + 16 * warp + g + 8 * r];
            const float new_max = fmaxf(row_max[r], fmaxf(tile_max[r], other));
            m_use[r] = new_max == NEG_INF ? 0.f : new_max;  // nothing valid yet: p = 0, not NaN
            alpha[r] = exp2f(row_max[r] - m_use[r]);
            row_max[r] = new_max;
            row_sum[r] *= alpha[r];
        }
        // 3. p = exp(score - m_new): float32 into the sums, bf16 into P's columns 32 wg .. 32 wg + 31
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const float p0 = exp2f(acc[4 * c] - m_use[0]), p1 = exp2f(acc[4 * c + 1] - m_use[0]);
            const float p2 = exp2f(acc[4 * c + 2] - m_use[1]), p3 = exp2f(acc[4 * c + 3] - m_use[1]);
            row_sum[0] += p0 + p1;
            row_sum[1] += p2 + p3;
            const int head = 16 * warp + g, chunk = 4 * wg + c;  // keys 32 wg + 8c + 2t, +1: bytes 4t, +1
            *reinterpret_cast<__nv_bfloat162*>(p_s + blocked(head, chunk) + 4 * t) =
                __floats2bfloat162_rn(p0, p1);
            *reinterpret_cast<__nv_bfloat162*>(p_s + blocked(head + 8, chunk) + 4 * t) =
                __floats2bfloat162_rn(p2, p3);
        }
        fence_proxy_async();  // this thread's P -> visible to the tensor cores' reads (after barrier C)
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {  // rescale, unless 1 everywhere
#pragma unroll
            for (int c = 0; c < 32; ++c) {
                o[4 * c] *= alpha[0];
                o[4 * c + 1] *= alpha[0];
                o[4 * c + 2] *= alpha[1];
                o[4 * c + 3] *= alpha[1];
            }
        }
        __syncthreads();  // (C) the whole 64 x 64 P is in p_s

        // 4. O_wg += P V[:, 256 wg ..]: 4 k-steps of 16 keys; P K-major, V N-major from block 4 wg
        const unsigned values_address = stage_address + 4 * wg * WGMMA_BLOCK_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < PREFILL_TILE / 16; ++kk)
            wgmma_m64n256k16_bf16_nb(o, wgmma_desc(p_address + 32 * kk),
                                     wgmma_desc_n_major(values_address + 2048 * kk));
        wgmma_commit();
        wgmma_wait<0>();  // P and this stage are read before anybody passes barrier (A) again
        fence_operands(o);
    }
    cp_async_wait<0>();  // only empty groups can be left, but leave nothing in flight

    // the sums: the quad's lanes (this warpgroup's 32 keys of every tile), then the other warpgroup's
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = quad_sum(row_sum[r]);
    if (t == 0) {  // every thread has read row_s's maxima before passing (C)
        row_s[wg * PREFILL_HEADS + 16 * warp + g] = row_sum[0];
        row_s[wg * PREFILL_HEADS + 16 * warp + g + 8] = row_sum[1];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int head = 16 * warp + g + 8 * r;
        const float total = row_sum[r] + row_s[(wg ^ 1) * PREFILL_HEADS + head];  // the same in both
        const float inv_sum = total > 0.f ? 1.f / total : 0.f;
        const size_t head_row = (size_t)token * n_h + h0 + head;
        __nv_bfloat16* out_row = out + head_row * D_C + 256 * wg + 2 * t;
#pragma unroll
        for (int c = 0; c < 32; ++c)
            *reinterpret_cast<__nv_bfloat162*>(out_row + 8 * c) =
                __floats2bfloat162_rn(o[4 * c + 2 * r] * inv_sum, o[4 * c + 2 * r + 1] * inv_sum);
        if (wg == 0 && t == 0) {
            max_logits[head_row] = total > 0.f ? row_max[r] * LN2 : NEG_INF;
            lse[head_row] = total > 0.f ? logf(total) + row_max[r] * LN2 : POS_INF;
        }
    }
#else
    __trap();  // wgmma needs sm_90a; dsa_tutorial never launches this kernel elsewhere
#endif
}
