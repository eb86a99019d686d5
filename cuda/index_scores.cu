// Index scores of the lightning indexer, equation 1:   I[t, s] = sum_h w[t, h] * ReLU(q_idx[t, h, :] . k_idx[s, :])
//
// Checked against dsa_tutorial.indexer.index_scores (float32) on the same bf16-rounded inputs;
// launched by dsa_tutorial.indexer.index_scores_cuda (its table INDEX_SCORES_KERNELS lists the versions).
//
//   q_idx  bfloat16 [T, H, D]   the indexer queries q^I (after RoPE and the Hadamard rotation)
//   w      float32  [T, H]      the head weights w^I (H^-0.5, D^-0.5 and any q scale folded in)
//   k_idx  bfloat16 [S, D]      the indexer keys k^I, ONE per token, shared by all H heads
//   out    float32  [T, S]      the scores; with `causal`, query t is the token at slot S - T + t
//                               and out[t, s] = -inf for s > S - T + t
//
// D is a multiple of 16, at most 256 (checked by index_scores_cuda); kernel 5 takes D = 128 only.
// No kernel reads an index or a position from memory: every address follows from T, S, H and D.
//
// The progression, each kernel a complete answer, each faster than the last:
//   kernel 1  index_scores_naive     one thread per score; q_idx and k_idx re-read from global memory
//             for every (t, s) pair: H * D * 2 loads per 2 * H * D flops.
//   kernel 2  index_scores_tiled     a block computes a 32 x 32 tile of scores: the 32 keys are staged
//             once in shared memory (float32) and serve all H heads; for each head the 32 queries
//             are staged too, and each thread computes 2 x 2 scores from shared memory.
//   kernel 3  index_scores_mma       tensor cores: for each head, the tile Q_h [64 x D] K^T [D x 128] is
//             a small GEMM done with mma.sync m16n8k16 (bf16 in, float32 accumulate); ReLU and the
//             weight w[t, h] are applied to the accumulators in registers, and the sum over heads
//             stays in registers too. The key tile is loaded once (cp.async) and the query tile of
//             head h + 1 is loaded while head h computes (double buffering).
//   kernel 4  index_scores_mma_wide  kernel 3 with 64 x 256 tiles (8 warps): every query tile read
//             from L2 serves twice the keys, at the price of fewer resident warps.
//   kernel 5  index_scores_mma_keys  tensor cores with the roles turned around: the keys are the A
//             operand, held in registers for all H heads (kernels 3 and 4 re-read them from shared
//             memory for every head); the queries of each head are the B operand, streamed through
//             shared memory (cp.async, 8 heads a stage, two stages in flight) and read with ldmatrix.
//             Each block covers 256 keys, so it reads its queries from L2 for 4 times as many keys as
//             kernel 3. D = 128 only (the loader checks): the key fragments are 128 registers.
#include <cuda_bf16.h>

#include "common.cuh"  // NEG_INF, load_pair, cp_async_*, mma_bf16_16816 (and _free), ldmatrix_x4

// ---------------------------------------------------------------------------------------------
// kernel 1: one thread per score; a block is NAIVE_THREADS keys of one query (grid.y = T <= 65535)
#define NAIVE_THREADS 128

extern "C" __global__ void __launch_bounds__(NAIVE_THREADS)
index_scores_naive(const __nv_bfloat16* __restrict__ q_idx, const float* __restrict__ w,
                   const __nv_bfloat16* __restrict__ k_idx, float* __restrict__ out,
                   int T, int S, int H, int D, int causal) {
    const int t = blockIdx.y;
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T || s >= S) return;
    if (causal && s > t + (S - T)) {  // key after the query: masked
        out[(size_t)t * S + s] = NEG_INF;
        return;
    }
    float score = 0.f;
    for (int h = 0; h < H; ++h) {
        const __nv_bfloat16* q_th = q_idx + ((size_t)t * H + h) * D;
        const __nv_bfloat16* k_s = k_idx + (size_t)s * D;
        // q_idx[t, h] . k_idx[s]
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += __bfloat162float(q_th[d]) * __bfloat162float(k_s[d]);
        // I[t, s] += w[t, h] ReLU(q_idx[t, h] . k_idx[s])
        score += w[(size_t)t * H + h] * fmaxf(dot, 0.f);
    }
    out[(size_t)t * S + s] = score;
}

// ---------------------------------------------------------------------------------------------
// kernel 2: 32 x 32 tiles in shared memory, 256 threads, 2 x 2 scores a thread
#define TILED_TILE 32                  // queries and keys per block
#define TILED_THREADS 256
#define TILED_SMEM_ROWS (2 * TILED_TILE)  // shared memory: this many float32 rows of D + 1 (keys, then queries)

extern "C" __global__ void __launch_bounds__(TILED_THREADS)
index_scores_tiled(const __nv_bfloat16* __restrict__ q_idx, const float* __restrict__ w,
                   const __nv_bfloat16* __restrict__ k_idx, float* __restrict__ out,
                   int T, int S, int H, int D, int causal) {
    extern __shared__ float tiled_smem[];
    const int stride = D + 1;  // odd row stride: the 16 keys a warp reads sit in 16 different banks
    float* k_tile = tiled_smem;                       // [TILED_TILE][D + 1] keys s0 .. s0 + 31
    float* q_tile = tiled_smem + TILED_TILE * stride;  // [TILED_TILE][D + 1] queries t0 .. t0 + 31 of one head
    const int t0 = blockIdx.y * TILED_TILE, s0 = blockIdx.x * TILED_TILE;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // this thread: t0 + ty + 16 i, s0 + tx + 16 j
    const int last_t = min(t0 + TILED_TILE, T) - 1;
    if (causal && s0 > last_t + (S - T)) {  // the whole tile is after every query: -inf, no work
        for (int i = threadIdx.x; i < TILED_TILE * TILED_TILE; i += TILED_THREADS) {
            const int t = t0 + i / TILED_TILE, s = s0 + i % TILED_TILE;
            if (t < T && s < S) out[(size_t)t * S + s] = NEG_INF;
        }
        return;  // the whole block returns together, before any barrier
    }
    for (int i = threadIdx.x; i < TILED_TILE * D; i += TILED_THREADS) {  // stage the keys once, zeros past S
        const int r = i / D, d = i % D;
        k_tile[r * stride + d] = s0 + r < S ? __bfloat162float(k_idx[(size_t)(s0 + r) * D + d]) : 0.f;
    }
    float score[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    for (int h = 0; h < H; ++h) {
        __syncthreads();  // everyone is done with the previous head's queries (and the keys are in)
        for (int i = threadIdx.x; i < TILED_TILE * D; i += TILED_THREADS) {
            const int r = i / D, d = i % D;
            q_tile[r * stride + d] = t0 + r < T ? __bfloat162float(q_idx[((size_t)(t0 + r) * H + h) * D + d]) : 0.f;
        }
        __syncthreads();
        float dot[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
        for (int d = 0; d < D; ++d) {
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    dot[i][j] += q_tile[(ty + 16 * i) * stride + d] * k_tile[(tx + 16 * j) * stride + d];
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int t = t0 + ty + 16 * i;
            const float w_th = t < T ? w[(size_t)t * H + h] : 0.f;
#pragma unroll
            for (int j = 0; j < 2; ++j) score[i][j] += w_th * fmaxf(dot[i][j], 0.f);  // w ReLU(q_idx . k_idx)
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int t = t0 + ty + 16 * i, s = s0 + tx + 16 * j;
            if (t < T && s < S) out[(size_t)t * S + s] = causal && s > t + (S - T) ? NEG_INF : score[i][j];
        }
}

// ---------------------------------------------------------------------------------------------
// kernels 3 and 4: tensor cores. Block tile 64 queries x TILE_S keys; 2 x TILE_S / 64 warps, each
// warp 32 queries x 64 keys = 2 x 8 tiles of m16n8. Two widths are compiled:
//   kernel 3  index_scores_mma       TILE_S = 128: 128 threads, 3 blocks an SM (12 warps)
//   kernel 4  index_scores_mma_wide  TILE_S = 256: 256 threads, 1 block an SM (8 warps), but every
//                                    query tile read from L2 serves twice the keys: half the L2 traffic
//                                    (each block re-reads its 64 queries for all H heads: 16 KiB a head)
#define MMA_T 64    // queries per block
#define MMA_PAD 8   // bf16 of padding per shared row: rows start 16 bytes apart modulo 128 bytes,
                    // so the 8 rows a fragment load touches fall in 8 different groups of banks
#define MMA_S 128                                      // kernel 3: keys per block
#define MMA_THREADS (2 * (MMA_S / 64) * 32)            // 2 warps along the queries x MMA_S / 64 along the keys
#define MMA_WIDE_S 256                                 // kernel 4: keys per block
#define MMA_WIDE_THREADS (2 * (MMA_WIDE_S / 64) * 32)
// shared memory, in rows of D + MMA_PAD bf16: the key tile, then two query tiles (heads h and h + 1)
#define MMA_SMEM_ROWS (MMA_S + 2 * MMA_T)
#define MMA_WIDE_SMEM_ROWS (MMA_WIDE_S + 2 * MMA_T)

// mma_bf16_16816 (cuda/common.cuh): D[16 x 8] += A[16 x 16] B[16 x 8], bf16 inputs, float32
// accumulators. Fragments (PTX ISA, mma.m16n8k16 for .bf16), with g = lane / 4 and c = lane % 4:
//   a[0] = A[g][2c, 2c+1]     a[1] = A[g+8][2c, 2c+1]   a[2] = A[g][2c+8, 2c+9]   a[3] = A[g+8][2c+8, 2c+9]
//   b[0] = B[2c, 2c+1][g]     b[1] = B[2c+8, 2c+9][g]
//   acc[0], acc[1] = D[g][2c, 2c+1]                    acc[2], acc[3] = D[g+8][2c, 2c+1]

// Stage `rows` rows of D bf16 (global rows `row_stride` elements apart) into shared rows of D + MMA_PAD;
// rows at or past `valid_rows` are filled with zeros (cp.async with src-size 0 reads nothing).
__device__ __forceinline__ void stage_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, int rows, int valid_rows,
                                           size_t row_stride, int D) {
    const int chunks_per_row = D / 8;  // 16-byte chunks
    for (int i = threadIdx.x; i < rows * chunks_per_row; i += blockDim.x) {
        const int r = i / chunks_per_row, c = i % chunks_per_row;
        const bool valid = r < valid_rows;
        const __nv_bfloat16* from = src + (valid ? (size_t)r * row_stride + c * 8 : 0);
        cp_async_16(dst + r * (D + MMA_PAD) + c * 8, from, valid ? 16 : 0);
    }
}

template <int TILE_S>
__device__ __forceinline__ void index_scores_mma_body(const __nv_bfloat16* __restrict__ q_idx,
                                                      const float* __restrict__ w,
                                                      const __nv_bfloat16* __restrict__ k_idx, float* __restrict__ out,
                                                      int T, int S, int H, int D, int causal) {
    constexpr int WARPS_S = TILE_S / 64;  // warps along the keys
    extern __shared__ __align__(16) __nv_bfloat16 mma_smem[];
    const int row = D + MMA_PAD;
    __nv_bfloat16* k_tile = mma_smem;                   // [TILE_S][D + 8]  keys s0 .. s0 + TILE_S - 1
    __nv_bfloat16* q_tiles = mma_smem + TILE_S * row;   // [2][MMA_T][D + 8]  queries of heads h, h + 1
    const int t0 = blockIdx.y * MMA_T, s0 = blockIdx.x * TILE_S;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4;                            // fragment coordinates
    const int warp_t = (warp / WARPS_S) * 32, warp_s = (warp % WARPS_S) * 64;  // this warp's corner in the tile

    const int last_t = min(t0 + MMA_T, T) - 1;
    if (causal && s0 > last_t + (S - T)) {  // every key of the tile is after every query: -inf, no work
        for (int i = threadIdx.x; i < MMA_T * TILE_S; i += blockDim.x) {
            const int t = t0 + i / TILE_S, s = s0 + i % TILE_S;
            if (t < T && s < S) out[(size_t)t * S + s] = NEG_INF;
        }
        return;  // block-uniform, before any barrier
    }

    // keys once for all heads, then the queries of head 0: one commit group
    stage_rows(k_tile, k_idx + (size_t)s0 * D, TILE_S, S - s0, D, D);
    stage_rows(q_tiles, q_idx + (size_t)t0 * H * D, MMA_T, T - t0, (size_t)H * D, D);
    cp_async_commit();

    float score[2][8][4];  // sum over heads of w ReLU(q_idx . k_idx), per warp 32 x 64, in fragment layout
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) score[mi][ni][e] = 0.f;

    for (int h = 0; h < H; ++h) {
        if (h + 1 < H) {  // prefetch head h + 1 into the other buffer while head h computes
            stage_rows(q_tiles + ((h + 1) % 2) * MMA_T * row, q_idx + ((size_t)t0 * H + h + 1) * D, MMA_T, T - t0,
                       (size_t)H * D, D);
            cp_async_commit();
            cp_async_wait<1>();  // everything but the newest group has landed: head h is in
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const __nv_bfloat16* q_tile = q_tiles + (h % 2) * MMA_T * row;

        // dot[t, s] = q_idx[t, h] . k_idx[s] for the warp's 32 x 64 tile: a GEMM over D in steps of 16
        float dot[2][8][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 8; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) dot[mi][ni][e] = 0.f;
        for (int d0 = 0; d0 < D; d0 += 16) {
            unsigned a[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const __nv_bfloat16* q_row = q_tile + (warp_t + mi * 16 + g) * row + d0 + 2 * c;
                a[mi][0] = load_pair(q_row);
                a[mi][1] = load_pair(q_row + 8 * row);
                a[mi][2] = load_pair(q_row + 8);
                a[mi][3] = load_pair(q_row + 8 * row + 8);
            }
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                // B = K^T: column n of B is key row n, so B[2c, 2c+1][g] are adjacent in k_tile
                const __nv_bfloat16* k_row = k_tile + (warp_s + ni * 8 + g) * row + d0 + 2 * c;
                const unsigned b0 = load_pair(k_row), b1 = load_pair(k_row + 8);
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) mma_bf16_16816(dot[mi][ni], a[mi], b0, b1);
            }
        }
        // I[t, s] += w[t, h] ReLU(dot[t, s]); this thread's rows are g and g + 8 of each m16 tile
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            const int t_top = t0 + warp_t + mi * 16 + g, t_bottom = t_top + 8;
            const float w_top = t_top < T ? w[(size_t)t_top * H + h] : 0.f;
            const float w_bottom = t_bottom < T ? w[(size_t)t_bottom * H + h] : 0.f;
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                score[mi][ni][0] += w_top * fmaxf(dot[mi][ni][0], 0.f);
                score[mi][ni][1] += w_top * fmaxf(dot[mi][ni][1], 0.f);
                score[mi][ni][2] += w_bottom * fmaxf(dot[mi][ni][2], 0.f);
                score[mi][ni][3] += w_bottom * fmaxf(dot[mi][ni][3], 0.f);
            }
        }
        __syncthreads();  // the buffer of head h is refilled (with head h + 2) next iteration
    }

    // store: accumulator e of tile (mi, ni) is row g + 8 (e / 2), column 2c + (e % 2)
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int t = t0 + warp_t + mi * 16 + g + 8 * (e / 2);
                const int s = s0 + warp_s + ni * 8 + 2 * c + (e % 2);
                if (t < T && s < S)
                    out[(size_t)t * S + s] = causal && s > t + (S - T) ? NEG_INF : score[mi][ni][e];
            }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
index_scores_mma(const __nv_bfloat16* __restrict__ q_idx, const float* __restrict__ w,
                 const __nv_bfloat16* __restrict__ k_idx, float* __restrict__ out, int T, int S, int H, int D,
                 int causal) {
    index_scores_mma_body<MMA_S>(q_idx, w, k_idx, out, T, S, H, D, causal);
}

extern "C" __global__ void __launch_bounds__(MMA_WIDE_THREADS)
index_scores_mma_wide(const __nv_bfloat16* __restrict__ q_idx, const float* __restrict__ w,
                      const __nv_bfloat16* __restrict__ k_idx, float* __restrict__ out, int T, int S, int H, int D,
                      int causal) {
    index_scores_mma_body<MMA_WIDE_S>(q_idx, w, k_idx, out, T, S, H, D, causal);
}

// ---------------------------------------------------------------------------------------------
// kernel 5: the keys stay in registers. Kernels 3 and 4 re-read their key fragments from shared memory
// for every head, although the keys are the same for all H heads. Here the roles turn around: the keys
// are the A operand (M = keys), held in registers for the whole block, and the queries of each head
// are the B operand (N = queries), streamed through shared memory with ldmatrix:
//
//   dot[s, t] = sum_d K[s, d] Q_h[t, d]   A = K tile [16 keys x 16 d] (registers, loaded once)
//                                         B = Q_h^T [16 d x 8 queries] (ldmatrix from shared memory)
//
// Block: 4 warps, 256 keys (64 a warp: 4 m16 tiles x 8 k-steps x 4 registers = 128 registers of
// keys) and 64 queries, taken 16 at a time (a "pass": 2 n8 tiles). For each pass the queries of
// all heads stream through shared memory, KEYS_STAGE_H heads a cp.async stage, two stages in
// flight; the weights w[t, h] are read one head ahead. Every query byte read from shared memory
// serves 64 keys (kernels 3 and 4: 32 or 64), and each block reads the queries of its 64 rows once
// for 256 keys: a quarter of kernel 3's L2 traffic. D is fixed at 128 (the DSA head dim).
#define KEYS_D 128                           // head dim kernel 5 is compiled for: 8 k-steps of 16
#define KEYS_WARPS 4
#define KEYS_PER_WARP 64                     // keys per warp: 4 m16 tiles
#define KEYS_S (KEYS_WARPS * KEYS_PER_WARP)  // keys per block
#define KEYS_T 64                            // queries per block
#define KEYS_PASS_T 16                       // queries per pass: 2 n8 tiles
#define KEYS_STAGE_H 8                       // heads per cp.async stage
#define KEYS_ROW (KEYS_D + MMA_PAD)          // bf16 per shared row (272 bytes: ldmatrix rows in distinct banks)
#define KEYS_THREADS (KEYS_WARPS * 32)
#define KEYS_STAGE_ELEMS (KEYS_STAGE_H * KEYS_PASS_T * KEYS_ROW)  // bf16 of one cp.async stage
#define KEYS_SMEM_BYTES (2 * KEYS_STAGE_ELEMS * 2)                // two stages in flight

// Here the mma is mma_bf16_16816_free (cuda/common.cuh): the same mma, not volatile, so the compiler
// may interleave it with the loads. ldmatrix_x4 (also there): lanes 8j .. 8j + 7 give the row
// addresses of matrix j, and register j of lane l receives row l / 4, columns 2 (l % 4), 2 (l % 4) + 1.

// Stage the queries t0 .. t0 + 15 of heads h0 .. h0 + KEYS_STAGE_H - 1 into buffer[hh][t - t0][:].
// Rows with t >= T or h >= H are zeros (cp.async with src-size 0 reads nothing).
__device__ __forceinline__ void stage_query_heads(__nv_bfloat16* buffer, const __nv_bfloat16* __restrict__ q_idx,
                                                  int t0, int h0, int T, int H) {
    constexpr int chunks = KEYS_D / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < KEYS_PASS_T * KEYS_STAGE_H * chunks; i += KEYS_THREADS) {
        // i = (r KEYS_STAGE_H + hh) chunks + cc: consecutive i are consecutive bytes of q_idx[t0 + r]
        const int cc = i % chunks, hh = (i / chunks) % KEYS_STAGE_H, r = i / (chunks * KEYS_STAGE_H);
        const bool valid = t0 + r < T && h0 + hh < H;
        const __nv_bfloat16* from = q_idx + (valid ? ((size_t)(t0 + r) * H + h0 + hh) * KEYS_D + cc * 8 : 0);
        cp_async_16(buffer + (hh * KEYS_PASS_T + r) * KEYS_ROW + cc * 8, from, valid ? 16 : 0);
    }
}

extern "C" __global__ void __launch_bounds__(KEYS_THREADS, 2)
index_scores_mma_keys(const __nv_bfloat16* __restrict__ q_idx, const float* __restrict__ w,
                      const __nv_bfloat16* __restrict__ k_idx, float* __restrict__ out, int T, int S, int H, int D,
                      int causal) {
    // KEYS_SMEM_BYTES: two stages of KEYS_STAGE_H heads x KEYS_PASS_T queries x KEYS_ROW bf16 (D == KEYS_D)
    extern __shared__ __align__(16) __nv_bfloat16 keys_smem[];
    constexpr int stage_elems = KEYS_STAGE_ELEMS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4;  // fragment coordinates
    const int s0 = blockIdx.x * KEYS_S, t0 = blockIdx.y * KEYS_T;
    const int warp_s = s0 + warp * KEYS_PER_WARP;  // this warp's first key
    const int t_end = min(t0 + KEYS_T, T);
    if (D != KEYS_D) return;  // index_scores_cuda never launches it so; a guard against rows of another length

    if (causal && s0 > t_end - 1 + (S - T)) {  // every key of the tile is after every query: -inf, no work
        for (int i = threadIdx.x; i < KEYS_T * KEYS_S; i += blockDim.x) {
            const int t = t0 + i / KEYS_S, s = s0 + i % KEYS_S;
            if (t < T && s < S) out[(size_t)t * S + s] = NEG_INF;
        }
        return;  // block-uniform, before any barrier
    }

    // A fragments of the warp's 64 keys, all of D, straight from global memory (zeros past S):
    //   key[mi][kk] = K[warp_s + 16 mi .. + 15][16 kk .. 16 kk + 15] in the mma layout
    //   [0] = K[g][2c, 2c+1]   [1] = K[g+8][2c, 2c+1]   [2] = K[g][2c+8, 2c+9]   [3] = K[g+8][2c+8, 2c+9]
    unsigned key[4][KEYS_D / 16][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
        const int s_top = warp_s + mi * 16 + g, s_bottom = s_top + 8;
#pragma unroll
        for (int kk = 0; kk < KEYS_D / 16; ++kk) {
            const int d = kk * 16 + 2 * c;
            key[mi][kk][0] = s_top < S ? load_pair(k_idx + (size_t)s_top * KEYS_D + d) : 0u;
            key[mi][kk][1] = s_bottom < S ? load_pair(k_idx + (size_t)s_bottom * KEYS_D + d) : 0u;
            key[mi][kk][2] = s_top < S ? load_pair(k_idx + (size_t)s_top * KEYS_D + d + 8) : 0u;
            key[mi][kk][3] = s_bottom < S ? load_pair(k_idx + (size_t)s_bottom * KEYS_D + d + 8) : 0u;
        }
    }
    // ldmatrix row addresses of this lane: matrix j = lane / 8 is queries 8 (j / 2) .. + 7, columns
    // 8 (j % 2) .. + 7 of the k-step: registers b[0], b[1] = B fragment of n-tile 0, b[2], b[3] of n-tile 1
    const int b_row = lane % 8 + 8 * (lane / 16), b_col = 8 * ((lane / 8) % 2);
    const int n_stages = (H + KEYS_STAGE_H - 1) / KEYS_STAGE_H;

    for (int tp = t0; tp < t_end; tp += KEYS_PASS_T) {  // block-uniform
        if (causal && s0 > min(tp + KEYS_PASS_T, T) - 1 + (S - T)) {  // this pass is fully masked
            for (int i = threadIdx.x; i < KEYS_PASS_T * KEYS_S; i += blockDim.x) {
                const int t = tp + i / KEYS_S, s = s0 + i % KEYS_S;
                if (t < T && s < S) out[(size_t)t * S + s] = NEG_INF;
            }
            continue;
        }
        // w for this thread's queries tp + 8 ni + 2c + j, head h: zero past T (those rows are not stored)
        float w_next[2][2];
#pragma unroll
        for (int ni = 0; ni < 2; ++ni)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int t = tp + 8 * ni + 2 * c + j;
                w_next[ni][j] = t < T ? __ldg(w + (size_t)t * H) : 0.f;
            }
        float score[4][2][4];  // sum over heads of w ReLU(q_idx . k_idx): [key tile][query tile][fragment]
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 2; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) score[mi][ni][e] = 0.f;

        stage_query_heads(keys_smem, q_idx, tp, 0, T, H);
        cp_async_commit();
        for (int st = 0; st < n_stages; ++st) {
            if (st + 1 < n_stages) {  // prefetch the next stage into the other buffer
                stage_query_heads(keys_smem + ((st + 1) % 2) * stage_elems, q_idx, tp, (st + 1) * KEYS_STAGE_H, T, H);
                cp_async_commit();
                cp_async_wait<1>();  // everything but the newest group has landed: stage st is in
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const __nv_bfloat16* stage = keys_smem + (st % 2) * stage_elems;
#pragma unroll 2
            for (int hh = 0; hh < KEYS_STAGE_H; ++hh) {
                const int h = st * KEYS_STAGE_H + hh;
                if (h >= H) break;  // block-uniform
                float w_cur[2][2];
#pragma unroll
                for (int ni = 0; ni < 2; ++ni)
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        w_cur[ni][j] = w_next[ni][j];
                        const int t = tp + 8 * ni + 2 * c + j;
                        w_next[ni][j] = t < T && h + 1 < H ? __ldg(w + (size_t)t * H + h + 1) : 0.f;
                    }
                // dot[s, t] = K[s] . Q_h[t] for the warp's 64 keys x 16 queries
                float dot[4][2][4];
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 2; ++ni)
#pragma unroll
                        for (int e = 0; e < 4; ++e) dot[mi][ni][e] = 0.f;
                const __nv_bfloat16* q_rows = stage + (hh * KEYS_PASS_T + b_row) * KEYS_ROW + b_col;
#pragma unroll
                for (int kk = 0; kk < KEYS_D / 16; ++kk) {
                    unsigned b[4];
                    ldmatrix_x4(b, q_rows + kk * 16);
#pragma unroll
                    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                        for (int ni = 0; ni < 2; ++ni)
                            mma_bf16_16816_free(dot[mi][ni], key[mi][kk], b[2 * ni], b[2 * ni + 1]);
                }
                // I[t, s] += w[t, h] ReLU(dot[s, t]); fragment e is key g + 8 (e / 2), query 2c + (e % 2)
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 2; ++ni)
#pragma unroll
                        for (int e = 0; e < 4; ++e) score[mi][ni][e] += w_cur[ni][e % 2] * fmaxf(dot[mi][ni][e], 0.f);
            }
            __syncthreads();  // the buffer of stage st is refilled (with stage st + 2) next iteration
        }
        // store: fragment e of tile (mi, ni) is key warp_s + 16 mi + g + 8 (e / 2), query tp + 8 ni + 2c + (e % 2)
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 2; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int s = warp_s + mi * 16 + g + 8 * (e / 2);
                    const int t = tp + ni * 8 + 2 * c + (e % 2);
                    if (t < T && s < S)
                        out[(size_t)t * S + s] = causal && s > t + (S - T) ? NEG_INF : score[mi][ni][e];
                }
    }
}
