// Sparse MLA attention in MQA mode, equation 2:   u_t = Attn(h_t, { c_s : s in S_t })
//
// Decode: both kernels serve ONE query token per sequence (a decode step over a cache of S tokens).
// Checked against dsa_tutorial.sparse_attention.sparse_mla_attention (float32, which also takes T
// query tokens); launched by sparse_mla_attention_cuda (its table SPARSE_MLA_ATTENTION_KERNELS).
//
//   q_abs    bfloat16 [B, n_h, 512]   the absorbed query of each head (W^UK folded in), one token a sequence
//   q_rope   bfloat16 [B, n_h, 64]    its rotary part (each kernel stages the query [q_abs | q_rope] of a
//                                     head from the two tensors: no concatenated copy, one launch a call)
//   kv       bfloat16 [B, S, 576]     the latent cache [c_kv (512) | k_rope (64)] (mla.LatentCache.kv)
//   indices  int32    [B, K]          the selected positions S_t; -1 (or anything outside [0, S)) = unused:
//                                     never read, whatever its value
//   out      float32  [B, n_h, 512]   o_latent = sum_{s in S_t} p_s c_kv[s], still in latent space
//
//   score_s,i = softmax_scale * (q_abs_i . c_kv[s] + q_rope_i . k_rope[s])
//   p_s,i     = exp(score_s,i - max) / sum_{s' in S_t} exp(score_s',i - max)
//
// A row with no valid index gets o_latent = 0 (the empty sum), never NaN.
//
//   kernel 1  sparse_mla_attention_simt  a first correct kernel. A block serves 32 heads of one sequence.
//             It walks the K selected positions in chunks of 32: gathers the 32 latents into shared
//             memory (each 576-value latent serves all 32 heads: that is MQA mode's point), computes
//             the 32 x 32 scores (one latent per lane), then updates each head's running max, running
//             sum and 512-value output with the online softmax, and writes o / sum at the end.
//             What it leaves on the table (the book says so): float32 CUDA-core math where FlashMLA
//             uses tensor cores, and n_h / 32 blocks per sequence that each gather the same latents.
//
//   kernel 2  sparse_mla_attention_mma  tensor cores (mma.sync m16n8k16 bf16, float32 accumulation).
//             A block serves 64 heads of one sequence (2 blocks per sequence at n_h = 128) with 8
//             warps. It walks the K selected positions in tiles of 64, gathering the next tile's 64
//             latents (1152 bytes each, 16-byte cp.async, zeros for unused slots) while it computes
//             on the current one (two shared-memory stages). Warp w owns head tile mt = w % 4 (16 heads)
//             and half = w / 4, which picks both its 32 of the tile's 64 keys for the scores and its 256
//             of the 512 output values: per tile it
//               1. computes S = Q K^T for its 16 heads x 32 keys (36 k-steps of 16 over the 576 dims;
//                  Q and K fragments by ldmatrix from XOR-swizzled shared memory),
//               2. swaps row maxima with its partner warp (same heads, other 32 keys) through shared
//                  memory, so both apply the same running max m to the online softmax,
//               3. writes P = exp(S - m) in bf16 to shared memory (its 16 x 32 half of the 16 x 64 P),
//               4. reads the whole 16 x 64 P back as A fragments and adds P V into its 16 x 256 float32
//                  output (V = the first 512 values of the same latents, ldmatrix.trans).
//             The two partial row sums (one per key half, same max) are added at the end.
//             Shared memory: Q 72 KiB + 2 stages x 72 KiB + P 8 KiB + 1 KiB = 225 KiB (one block per SM).
//             P is rounded to bf16 before P V (and the row sums add the same rounded values), so it
//             matches the float32 reference to ~1e-3 of max|o|, not 1e-5 (the tests say why 1e-2).
//             What it leaves on the table: wgmma (sm_90's warpgroup MMA, which FlashMLA uses), the FP8
//             cache FlashMLA reads (656 bytes a token), and the 2 blocks of one sequence each gathering the same latents
//             (the second read mostly hits L2). Its limit is shared-memory bandwidth: ~176 ldmatrix.x4
//             per warp per tile against 272 mma.
#include <cuda_bf16.h>

#include "common.cuh"  // NEG_INF, smem_address, cp_async_*, ldmatrix_x4 (and _trans), mma_bf16_16816_free

#define D_C 512                // kv_lora_rank: the latent c_kv
#define D_R 64                 // qk_rope_head_dim: the shared rotary key k_rope
#define D_L (D_C + D_R)        // 576 values per cached token
#define ROW (D_L + 2)          // bf16 per shared row: 289 words, an odd stride, so 32 lanes reading
                               // 32 different rows at the same column hit 32 different banks
#define SPARSE_HEADS 32        // kernel 1: heads per block
#define SPARSE_CHUNK 32        // kernel 1: selected positions per step
#define SPARSE_THREADS 256
#define PARTS (SPARSE_THREADS / SPARSE_HEADS)  // 8 threads share one head's 512 output values
#define PAIRS (D_C / (2 * PARTS))              // 32 pairs of output values per thread
// kernel 1's dynamic shared memory: queries and latents [.][ROW] bf16, scores [HEADS][CHUNK] f32, indices [CHUNK]
#define SPARSE_SMEM_BYTES ((SPARSE_HEADS + SPARSE_CHUNK) * ROW * 2 + SPARSE_HEADS * SPARSE_CHUNK * 4 + SPARSE_CHUNK * 4)

// ------------------------------------------------------------------------------------ kernel 1
__device__ __forceinline__ float2 load_bf16x2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

// Pair p (of D_L / 2) of the query of head h of sequence b: [q_abs | q_rope], read from the two tensors.
__device__ __forceinline__ __nv_bfloat162 query_pair(const __nv_bfloat16* __restrict__ q_abs,
                                                     const __nv_bfloat16* __restrict__ q_rope, size_t head_row, int p) {
    return p < D_C / 2 ? reinterpret_cast<const __nv_bfloat162*>(q_abs + head_row * D_C)[p]
                       : reinterpret_cast<const __nv_bfloat162*>(q_rope + head_row * D_R)[p - D_C / 2];
}

extern "C" __global__ void __launch_bounds__(SPARSE_THREADS)
sparse_mla_attention_simt(const __nv_bfloat16* __restrict__ q_abs, const __nv_bfloat16* __restrict__ q_rope,
                          const __nv_bfloat16* __restrict__ kv, const int* __restrict__ indices,
                          float* __restrict__ out, int B, int S, int n_h, int K, float softmax_scale) {
    extern __shared__ __align__(16) unsigned char sparse_smem[];
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(sparse_smem);  // [SPARSE_HEADS][ROW]
    __nv_bfloat16* kv_s = q_s + SPARSE_HEADS * ROW;                       // [SPARSE_CHUNK][ROW]
    float* score_s = reinterpret_cast<float*>(kv_s + SPARSE_CHUNK * ROW);  // [SPARSE_HEADS][SPARSE_CHUNK]
    int* index_s = reinterpret_cast<int*>(score_s + SPARSE_HEADS * SPARSE_CHUNK);  // [SPARSE_CHUNK]

    const int b = blockIdx.y, h0 = blockIdx.x * SPARSE_HEADS;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int* index_row = indices + (size_t)b * K;

    // the block's 32 queries [q_abs | q_rope], zeros for heads past n_h (copied as 4-byte pairs: rows
    // are 4-byte aligned)
    for (int i = tid; i < SPARSE_HEADS * (D_L / 2); i += SPARSE_THREADS) {
        const int hh = i / (D_L / 2), p = i % (D_L / 2);
        __nv_bfloat162 pair = __floats2bfloat162_rn(0.f, 0.f);
        if (h0 + hh < n_h) pair = query_pair(q_abs, q_rope, (size_t)b * n_h + h0 + hh, p);
        reinterpret_cast<__nv_bfloat162*>(q_s + hh * ROW)[p] = pair;
    }

    // this thread's share of the output: head `head`, values 2 part + 16 i and the next, i < PAIRS
    const int head = tid / PARTS, part = tid % PARTS;
    float o[PAIRS][2];
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) o[i][0] = o[i][1] = 0.f;
    float running_max = NEG_INF, running_sum = 0.f;

    for (int j0 = 0; j0 < K; j0 += SPARSE_CHUNK) {
        __syncthreads();  // the previous chunk is fully used (and q_s is written, the first time)
        if (tid < SPARSE_CHUNK) {
            const int j = j0 + tid;
            const int s = j < K ? index_row[j] : -1;
            index_s[tid] = (s >= 0 && s < S) ? s : -1;  // out-of-range entries count as unused
        }
        __syncthreads();
        // gather the selected latents c_s = [c_kv[s] | k_rope[s]], zeros for unused slots
        for (int i = tid; i < SPARSE_CHUNK * (D_L / 2); i += SPARSE_THREADS) {
            const int jj = i / (D_L / 2), p = i % (D_L / 2);
            const int s = index_s[jj];
            __nv_bfloat162 pair = __floats2bfloat162_rn(0.f, 0.f);
            if (s >= 0) pair = reinterpret_cast<const __nv_bfloat162*>(kv + ((size_t)b * S + s) * D_L)[p];
            reinterpret_cast<__nv_bfloat162*>(kv_s + jj * ROW)[p] = pair;
        }
        __syncthreads();
        // scores: warp w takes heads 4w .. 4w + 3, lane jj takes latent jj of the chunk
        {
            float dot[SPARSE_HEADS / 8] = {0.f, 0.f, 0.f, 0.f};
            const __nv_bfloat16* c_row = kv_s + lane * ROW;
            for (int p = 0; p < D_L; p += 2) {
                const float2 c = load_bf16x2(c_row + p);
#pragma unroll
                for (int x = 0; x < SPARSE_HEADS / 8; ++x) {
                    const float2 qq = load_bf16x2(q_s + (warp * (SPARSE_HEADS / 8) + x) * ROW + p);  // broadcast
                    dot[x] += qq.x * c.x + qq.y * c.y;
                }
            }
#pragma unroll
            for (int x = 0; x < SPARSE_HEADS / 8; ++x)
                // score = softmax_scale (q_abs . c_kv + q_rope . k_rope); -inf for unused slots
                score_s[(warp * (SPARSE_HEADS / 8) + x) * SPARSE_CHUNK + lane] =
                    index_s[lane] >= 0 ? dot[x] * softmax_scale : NEG_INF;
        }
        __syncthreads();
        // online softmax for this thread's head (the 8 threads of a head do the same arithmetic)
        float chunk_max = NEG_INF;
        for (int jj = 0; jj < SPARSE_CHUNK; ++jj) chunk_max = fmaxf(chunk_max, score_s[head * SPARSE_CHUNK + jj]);
        const float new_max = fmaxf(running_max, chunk_max);
        if (new_max == NEG_INF) continue;  // nothing valid yet for this head: o and the sum stay 0
        // rescale what was accumulated under the old max: exp(m_old - m_new)
        const float alpha = expf(running_max - new_max);
        running_sum *= alpha;
#pragma unroll
        for (int i = 0; i < PAIRS; ++i) {
            o[i][0] *= alpha;
            o[i][1] *= alpha;
        }
        for (int jj = 0; jj < SPARSE_CHUNK; ++jj) {
            // p_s = exp(score_s - m_new) (0 for unused slots, whose latent is zeros anyway)
            const float p = expf(score_s[head * SPARSE_CHUNK + jj] - new_max);
            running_sum += p;
            const __nv_bfloat16* c_row = kv_s + jj * ROW + 2 * part;
#pragma unroll
            for (int i = 0; i < PAIRS; ++i) {
                // o += p_s c_kv[s]
                const float2 c = load_bf16x2(c_row + 16 * i);
                o[i][0] += p * c.x;
                o[i][1] += p * c.y;
            }
        }
        running_max = new_max;
    }
    // o_latent = o / sum_s p_s (0 when nothing was selected)
    if (h0 + head < n_h) {
        const float inv_sum = running_sum > 0.f ? 1.f / running_sum : 0.f;
        float* out_row = out + ((size_t)b * n_h + h0 + head) * D_C;
#pragma unroll
        for (int i = 0; i < PAIRS; ++i) {
            out_row[2 * part + 16 * i] = o[i][0] * inv_sum;
            out_row[2 * part + 16 * i + 1] = o[i][1] * inv_sum;
        }
    }
}

// ------------------------------------------------------------------------------------ kernel 2
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16), lane = 4 g + t:
//   A (16 x 16, row-major)  a0: (row g,     k 2t, 2t+1)  a1: (row g + 8, k 2t, 2t+1)
//                           a2: (row g,     k 2t+8, +9)  a3: (row g + 8, k 2t+8, +9)
//   B (16 x 8, "col")       b0: (k 2t, 2t+1, col g)      b1: (k 2t+8, 2t+9, col g)
//   C (16 x 8, float32)     c0, c1: (row g, col 2t, 2t+1)  c2, c3: (row g + 8, col 2t, 2t+1)
// (each 32-bit register holds two bf16, the lower k or column in the low half).
// ldmatrix.x4 hands register i the 8x8 matrix whose 8 row addresses lanes 8i .. 8i+7 give; without
// .trans lane 4g + t gets (row g, columns 2t, 2t+1) of it, with .trans (rows 2t, 2t+1, column g).
//
// Shared rows are 16-byte chunks; chunk c of row r sits at position c ^ (r % 8) (an XOR swizzle), so
// the 8 rows one ldmatrix phase reads at the same logical chunk fall in 8 different bank groups.

#define MMA_HEADS 64              // heads per block: 4 head tiles of 16
#define MMA_TILE 64               // selected latents per shared-memory stage
#define MMA_THREADS 256           // 8 warps: 4 head tiles x 2 halves
#define L_CHUNKS (D_L / 8)        // 72 chunks of 16 bytes in a 576-value latent row
#define C_CHUNKS (D_C / 8)        // the first 64 of them: c_kv (or q_abs); the last 8: k_rope (or q_rope)
#define P_CHUNKS (MMA_TILE / 8)   // 8 chunks in a 64-value row of P
// kernel 2's dynamic shared memory: Q [MMA_HEADS][576] + 2 stages x [MMA_TILE][576] + P [MMA_HEADS][MMA_TILE]
// bf16, then the row exchange [2][MMA_HEADS] f32 and the valid flags [2][MMA_TILE] i32: 225 KiB
#define MMA_SMEM_BYTES ((MMA_HEADS + 2 * MMA_TILE) * D_L * 2 + MMA_HEADS * MMA_TILE * 2 + 2 * (MMA_HEADS + MMA_TILE) * 4)

// bf16 offset of chunk `chunk` of row `row` in a swizzled array of `chunks` chunks a row
__device__ __forceinline__ int swizzled(int row, int chunk, int chunks) {
    return (row * chunks + (chunk ^ (row & 7))) * 8;
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
sparse_mla_attention_mma(const __nv_bfloat16* __restrict__ q_abs, const __nv_bfloat16* __restrict__ q_rope,
                         const __nv_bfloat16* __restrict__ kv, const int* __restrict__ indices,
                         float* __restrict__ out, int B, int S, int n_h, int K, float softmax_scale) {
    extern __shared__ __align__(16) unsigned char sparse_smem[];
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(sparse_smem);  // [MMA_HEADS][576], swizzled
    __nv_bfloat16* kv_s = q_s + MMA_HEADS * D_L;                          // [2][MMA_TILE][576], swizzled
    __nv_bfloat16* p_s = kv_s + 2 * MMA_TILE * D_L;                       // [MMA_HEADS][MMA_TILE], swizzled
    float* row_s = reinterpret_cast<float*>(p_s + MMA_HEADS * MMA_TILE);   // [2 halves][MMA_HEADS]
    int* valid_s = reinterpret_cast<int*>(row_s + 2 * MMA_HEADS);         // [2 stages][MMA_TILE]

    const int b = blockIdx.y, h0 = blockIdx.x * MMA_HEADS;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int mt = warp % 4, half = warp / 4;  // head tile (heads h0 + 16 mt ..) and key / output half
    const int g = lane / 4, t = lane % 4;      // the fragment coordinates of this lane
    const int* index_row = indices + (size_t)b * K;
    const __nv_bfloat16* kv_b = kv + (size_t)b * S * D_L;

    // the block's 64 queries [q_abs | q_rope] (chunks 0..63 from q_abs, 64..71 from q_rope), zeros
    // for heads past n_h
    for (int i = tid; i < MMA_HEADS * L_CHUNKS; i += MMA_THREADS) {
        const int r = i / L_CHUNKS, c = i % L_CHUNKS;
        const bool inside = h0 + r < n_h;
        const size_t head_row = (size_t)b * n_h + (inside ? h0 + r : 0);
        const __nv_bfloat16* src =
            c < C_CHUNKS ? q_abs + head_row * D_C + c * 8 : q_rope + head_row * D_R + (c - C_CHUNKS) * 8;
        cp_async_16(q_s + swizzled(r, c, L_CHUNKS), src, inside ? 16 : 0);
    }
    // gather tile `tile` of the selection into stage `stage`: c_s = [c_kv[s] | k_rope[s]], zeros when unused
    auto load_tile = [&](int tile, int stage) {
        const int j0 = tile * MMA_TILE;
        __nv_bfloat16* dst = kv_s + stage * MMA_TILE * D_L;
        for (int i = tid; i < MMA_TILE * L_CHUNKS; i += MMA_THREADS) {
            const int r = i / L_CHUNKS, c = i % L_CHUNKS;
            const int s = j0 + r < K ? __ldg(index_row + j0 + r) : -1;
            const bool used = s >= 0 && s < S;  // out-of-range entries count as unused, never read
            cp_async_16(dst + swizzled(r, c, L_CHUNKS), kv_b + (size_t)(used ? s : 0) * D_L + c * 8, used ? 16 : 0);
        }
        if (tid < MMA_TILE) {
            const int s = j0 + tid < K ? __ldg(index_row + j0 + tid) : -1;
            valid_s[stage * MMA_TILE + tid] = s >= 0 && s < S;
        }
    };

    // this warp's output: heads 16 mt + g (c0, c1) and + 8 (c2, c3), values 256 half + 8 n + 2t, +1
    float o[32][4];
#pragma unroll
    for (int n = 0; n < 32; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    // running max and (this warp's partial) sum of rows g and g + 8, in the base-2 domain
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};
    const float scale_log2 = softmax_scale * 1.4426950408889634f;  // exp(x) = 2^(x log2 e)

    const int n_tiles = (K + MMA_TILE - 1) / MMA_TILE;
    load_tile(0, 0);
    cp_async_commit();  // the queries and tile 0
    for (int tile = 0; tile < n_tiles; ++tile) {
        const int stage = tile % 2;
        cp_async_wait<0>();
        __syncthreads();  // (A) tile `tile` is in shared memory; every warp is done with tile - 1
        if (tile + 1 < n_tiles) load_tile(tile + 1, stage ^ 1);  // overlaps with the math below
        cp_async_commit();
        const __nv_bfloat16* k_tile = kv_s + stage * MMA_TILE * D_L;

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
        // score_s,i = softmax_scale (q_i . c_s) (times log2 e), -inf for unused slots; row maxima
        const int* valid = valid_s + stage * MMA_TILE + 32 * half;
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
            row_s[half * MMA_HEADS + 16 * mt + g] = tile_max[0];
            row_s[half * MMA_HEADS + 16 * mt + g + 8] = tile_max[1];
        }
        __syncthreads();  // (B) both halves' maxima are in row_s

        // 2. m_new = max(m_old, max over all 64 keys); the partner warp computes the same value
        float m_use[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float other = row_s[(half ^ 1) * MMA_HEADS + 16 * mt + g + 8 * r];
            const float new_max = fmaxf(row_max[r], fmaxf(tile_max[r], other));
            m_use[r] = new_max == NEG_INF ? 0.f : new_max;  // nothing valid yet: p = 0, not NaN
            alpha[r] = exp2f(row_max[r] - m_use[r]);      // exp(m_old - m_new): 0 the first time
            row_max[r] = new_max;
            row_sum[r] *= alpha[r];
        }
        // 3. p_s,i = exp(score - m_new), rounded to bf16 (the A operand of P V); the sums add the same values
#pragma unroll
        for (int n = 0; n < 4; ++n) {
            const __nv_bfloat162 top = __floats2bfloat162_rn(exp2f(acc[n][0] - m_use[0]), exp2f(acc[n][1] - m_use[0]));
            const __nv_bfloat162 bottom = __floats2bfloat162_rn(exp2f(acc[n][2] - m_use[1]), exp2f(acc[n][3] - m_use[1]));
            const float2 top_f = __bfloat1622float2(top), bottom_f = __bfloat1622float2(bottom);
            row_sum[0] += top_f.x + top_f.y;
            row_sum[1] += bottom_f.x + bottom_f.y;
            const int row = 16 * mt + g, chunk = 4 * half + n;  // keys 32 half + 8 n + 2t, +1
            *reinterpret_cast<__nv_bfloat162*>(p_s + swizzled(row, chunk, P_CHUNKS) + 2 * t) = top;
            *reinterpret_cast<__nv_bfloat162*>(p_s + swizzled(row + 8, chunk, P_CHUNKS) + 2 * t) = bottom;
        }
#pragma unroll
        for (int n = 0; n < 32; ++n) {  // rescale what was accumulated under the old max
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
        __syncthreads();  // (C) the whole 64 x 64 P is in p_s

        // 4. o += P V: [16, 64] x [64, 256], V = c_kv of the tile's latents, values 256 half ..
#pragma unroll
        for (int kk = 0; kk < MMA_TILE / 16; ++kk) {
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

    // sum_s p_s over all 64 keys of every tile: this lane's columns, its quad's, then the partner warp's
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    }
    __syncthreads();  // every warp has read the last tile's maxima from row_s
    if (t == 0) {
        row_s[half * MMA_HEADS + 16 * mt + g] = row_sum[0];
        row_s[half * MMA_HEADS + 16 * mt + g + 8] = row_sum[1];
    }
    __syncthreads();
    // o_latent = o / sum_s p_s (0 when nothing was selected)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int head = h0 + 16 * mt + g + 8 * r;
        const float total = row_sum[r] + row_s[(half ^ 1) * MMA_HEADS + 16 * mt + g + 8 * r];
        const float inv_sum = total > 0.f ? 1.f / total : 0.f;
        if (head < n_h) {
            float* out_row = out + ((size_t)b * n_h + head) * D_C + 256 * half + 2 * t;
#pragma unroll
            for (int n = 0; n < 32; ++n)
                *reinterpret_cast<float2*>(out_row + 8 * n) = make_float2(o[n][2 * r] * inv_sum, o[n][2 * r + 1] * inv_sum);
        }
    }
}
