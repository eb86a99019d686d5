// Absorbed MLA scores over the latent cache (MQA mode, chapter 2), the decode step's score GEMM:
//
//     score[b, r, s] = (q_abs[b, r] . c_kv[b, s] + q_rope[b, r] . k_rope[b, s]) * softmax_scale
//
// r runs over the R = T * n_h query rows of batch entry b (every head of every new token), s over
// the S cached tokens; q_abs = W^UK^T q^C (d_c values), q_rope (d_R); the cache row
// latent[b, s] = [c_kv (d_c) | k_rope (d_R)] holds d_c + d_R values (576 for V3.2). Seen this way
// it is one batched matrix product per batch entry, [R, 576] x [576, S]: all R rows share the
// same cache, which is what MQA mode buys (one cache read serves all 128 heads).
//
//   kernel 1  latent_scores_naive_f32   one thread per score, reads q and the latent row from
//                                       global memory (latent rows are 2304 B apart: uncoalesced)
//   kernel 2  latent_scores_tiled_f32   64 rows x 64 keys per block, 32 dims of each staged in
//                                       shared memory, 4 x 4 scores per thread (CUDA cores)
//   kernel 3  latent_scores_mma_bf16    bf16 inputs on tensor cores (mma.sync m16n8k16, float32
//                                       accumulation); 128 rows x 64 keys per block, so at decode
//                                       (R = 128 heads) each cache row is read from DRAM once; the
//                                       next 32 dims are loaded into registers while the tensor
//                                       cores work on the current ones
//   kernel 4  latent_scores_pipelined_bf16  the same mma, fed without stalls: the 128 x 576 query
//                                       tile stays in shared memory for all the keys a block
//                                       computes, one persistent block per SM, the cache streamed
//                                       through a 5-stage cp.async pipeline, fragments loaded with
//                                       ldmatrix from XOR-swizzled tiles, 128 x 128 scores a tile
//
// Inputs are contiguous: q_abs [B, R, d_c], q_rope [B, R, d_R], latent [B, S, d_c + d_R];
// output scores float32 [B, R, S]. Grids (the loader reads every size below from the #defines, and
// refuses inputs only by these limits):
//   kernel 1  (ceil(S / NAIVE_THREADS), R, B) x NAIVE_THREADS      R <= 65535, B <= 65535
//   kernel 2  (ceil(S / TILE), ceil(R / TILE), B) x THREADS        ceil(R / TILE) <= 65535, B <= 65535
//   kernel 3  (ceil(S / TILE), ceil(R / MMA_ROWS), B) x THREADS    ceil(R / MMA_ROWS) <= 65535, B <= 65535
//   kernel 4  min(#SMs, tiles) x THREADS, a 1-D grid: no limit but the int32 count of the
//             B ceil(R / PIPE_ROWS) ceil(S / PIPE_KEYS) tiles; dynamic shared memory (below)
//             229376 bytes at d_c + d_R = 576, checked against the device's limit
// Every tail (R, S, and d_c + d_R not multiples of the tile) is zero-filled on load and masked on
// store. Kernels 3 and 4 need d_c and d_R multiples of 16 and 16-byte aligned inputs. No input holds
// an index: every address follows from the sizes, so any values are memory-safe.
// Checked against dsa_tutorial.mla.latent_scores (which takes c_kv and k_rope as two tensors);
// loader dsa_tutorial.mla.latent_scores_cuda (table LATENT_SCORES_KERNELS).
#include <cuda_bf16.h>

#include "common.cuh"  // load_pair, mma_bf16_16816, smem_address, cp_async_*, ldmatrix_x4

#define TILE 64            // query rows (kernel 2) and cached keys (kernels 2, 3) per block
#define BK 32              // latent dims staged in shared memory per step (kernels 2, 3)
#define THREADS 256        // threads per block of kernels 2, 3, 4
#define NAIVE_THREADS 128  // threads per block of kernel 1: one per key

// Element d of query row `row` (global row index b * R + r): [q_abs (d_c) | q_rope (d_R)].
__device__ __forceinline__ float query_at(const float* __restrict__ q_abs, const float* __restrict__ q_rope,
                                          long long row, int d, int d_c, int d_rope) {
    return d < d_c ? q_abs[row * d_c + d] : q_rope[row * d_rope + (d - d_c)];
}

// ------------------------------------------------------------------------------------ kernel 1
extern "C" __global__ void __launch_bounds__(NAIVE_THREADS)
latent_scores_naive_f32(const float* q_abs, const float* q_rope, const float* latent, float* scores,
                        int n_rows, int n_keys, int d_c, int d_rope, float softmax_scale) {
    const int b = blockIdx.z, r = blockIdx.y;
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= n_keys) return;
    const int width = d_c + d_rope;
    const long long row = (long long)b * n_rows + r;
    const float* latent_s = latent + ((long long)b * n_keys + s) * width;
    // q_abs . c_kv + q_rope . k_rope, as one dot product over the 576 latent dims
    float score = 0.f;
    for (int d = 0; d < width; ++d) score += query_at(q_abs, q_rope, row, d, d_c, d_rope) * latent_s[d];
    scores[row * n_keys + s] = score * softmax_scale;
}

// ------------------------------------------------------------------------------------ kernel 2
// Thread (tx, ty) = (tid % 16, tid / 16) owns rows ty + 16 i and keys tx + 16 j (i, j < 4): strided
// so that a warp's shared-memory reads hit 16 consecutive words (keys) or 2 broadcast words (rows).
extern "C" __global__ void __launch_bounds__(THREADS)
latent_scores_tiled_f32(const float* q_abs, const float* q_rope, const float* latent, float* scores,
                        int n_rows, int n_keys, int d_c, int d_rope, float softmax_scale) {
    __shared__ float q_tile[BK][TILE + 1];   // [dim][row], +1: the transposing stores are conflict-free
    __shared__ float kv_tile[BK][TILE + 1];  // [dim][key]
    const int b = blockIdx.z, row0 = blockIdx.y * TILE, key0 = blockIdx.x * TILE;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int width = d_c + d_rope;
    float acc[4][4] = {};
    for (int d0 = 0; d0 < width; d0 += BK) {
        // stage 64 rows x 32 dims of q and of the cache: lanes read 32 consecutive dims (coalesced)
        const int dd = tid % 32, d = d0 + dd;
        for (int l = 0; l < TILE * BK / THREADS; ++l) {
            const int local = tid / 32 + (THREADS / 32) * l;
            const int r = row0 + local, s = key0 + local;
            q_tile[dd][local] = (r < n_rows && d < width)
                ? query_at(q_abs, q_rope, (long long)b * n_rows + r, d, d_c, d_rope) : 0.f;
            kv_tile[dd][local] = (s < n_keys && d < width) ? latent[((long long)b * n_keys + s) * width + d] : 0.f;
        }
        __syncthreads();
        // acc[i][j] += q[row_i, d] * latent[key_j, d] over the 32 staged dims
        for (int k = 0; k < BK; ++k) {
            float q_r[4], kv_s[4];
            for (int i = 0; i < 4; ++i) q_r[i] = q_tile[k][ty + 16 * i];
            for (int j = 0; j < 4; ++j) kv_s[j] = kv_tile[k][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += q_r[i] * kv_s[j];
        }
        __syncthreads();  // the tiles are overwritten by the next step
    }
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + ty + 16 * i;
        if (r >= n_rows) continue;
        for (int j = 0; j < 4; ++j) {
            const int s = key0 + tx + 16 * j;
            if (s < n_keys) scores[((long long)b * n_rows + r) * n_keys + s] = acc[i][j] * softmax_scale;
        }
    }
}

// ------------------------------------------------------------------------------------ kernel 3
// Tensor cores: mma.sync.m16n8k16 with A = 16 query rows x 16 dims (row-major), B = 16 dims x 8 keys
// ("col": each key's dims contiguous, which is how the cache stores them), C = 16 x 8 float32.
// Block tile MMA_ROWS x TILE = 128 rows x 64 keys; 8 warps in a 4 x 2 grid, warp w computing rows
// 32 (w % 4) .. +31 and keys 32 (w / 4) .. +31: two 16-row A fragments times four 8-key B fragments,
// 8 mma per 16 dims. Fragment layouts (PTX ISA, m16n8k16 .bf16), with g = lane / 4, c = lane % 4:
//   A regs a0..a3: (row g, dims 2c, 2c+1), (row g+8, 2c..), (row g, 2c+8..), (row g+8, 2c+8..)
//   B regs b0, b1: (dims 2c, 2c+1; key g), (dims 2c+8, 2c+9; key g)
//   C c0..c3:      (row g, keys 2c, 2c+1), (row g+8, keys 2c, 2c+1)
// Two bf16 of one 32-bit register are adjacent in memory, the lower address in the low half.
#define MMA_ROWS 128  // query rows per block of kernel 3 (and TILE keys): all 128 heads of a decode token
#define PAD 8  // bf16 of padding per staged row: a 40-element (20-word) stride, conflict-free fragment loads

// 8 bf16 (16 bytes) of query row r (of this block's batch entry), dims d .. d+7; zeros past the ends.
// d_c % 8 == 0, so the 8 dims lie all in q_abs or all in q_rope.
__device__ __forceinline__ uint4 query_chunk(const __nv_bfloat16* q_abs, const __nv_bfloat16* q_rope, long long row,
                                             bool valid, int d, int d_c, int d_rope) {
    if (!valid || d >= d_c + d_rope) return make_uint4(0, 0, 0, 0);
    const __nv_bfloat16* src = d < d_c ? q_abs + row * d_c + d : q_rope + row * d_rope + (d - d_c);
    return *reinterpret_cast<const uint4*>(src);
}

extern "C" __global__ void __launch_bounds__(THREADS)
latent_scores_mma_bf16(const __nv_bfloat16* q_abs, const __nv_bfloat16* q_rope, const __nv_bfloat16* latent,
                       float* scores, int n_rows, int n_keys, int d_c, int d_rope, float softmax_scale) {
    __shared__ __align__(16) __nv_bfloat16 q_tile[MMA_ROWS][BK + PAD];  // [row][dim]
    __shared__ __align__(16) __nv_bfloat16 kv_tile[TILE][BK + PAD];     // [key][dim]
    const int b = blockIdx.z, row0 = blockIdx.y * MMA_ROWS, key0 = blockIdx.x * TILE;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
    const int warp_row = 32 * (warp % 4), warp_key = 32 * (warp / 4);
    const int width = d_c + d_rope;
    // staging: a 32-dim row is 4 chunks of 8 bf16; thread tid moves chunk tid % 4 of query rows
    // tid / 4 and tid / 4 + 64, and of cache row (key) tid / 4
    const int stage_row = tid / 4, stage_dim = 8 * (tid % 4);
    const int r_lo = row0 + stage_row, r_hi = row0 + stage_row + 64, s = key0 + stage_row;
    const long long q_lo = (long long)b * n_rows + r_lo, q_hi = (long long)b * n_rows + r_hi;
    const __nv_bfloat16* latent_s = latent + ((long long)b * n_keys + s) * width;
    auto load_step = [&](int d0, uint4& q_a, uint4& q_b, uint4& kv) {
        const int d = d0 + stage_dim;
        q_a = query_chunk(q_abs, q_rope, q_lo, r_lo < n_rows, d, d_c, d_rope);
        q_b = query_chunk(q_abs, q_rope, q_hi, r_hi < n_rows, d, d_c, d_rope);
        kv = (s < n_keys && d < width) ? *reinterpret_cast<const uint4*>(latent_s + d) : make_uint4(0, 0, 0, 0);
    };
    float acc[2][4][4] = {};  // [16-row tile][8-key tile][c0..c3]
    uint4 q_a, q_b, kv;
    load_step(0, q_a, q_b, kv);
    for (int d0 = 0; d0 < width; d0 += BK) {
        *reinterpret_cast<uint4*>(&q_tile[stage_row][stage_dim]) = q_a;
        *reinterpret_cast<uint4*>(&q_tile[stage_row + 64][stage_dim]) = q_b;
        *reinterpret_cast<uint4*>(&kv_tile[stage_row][stage_dim]) = kv;
        __syncthreads();
        if (d0 + BK < width) load_step(d0 + BK, q_a, q_b, kv);  // in flight while the mma run
        for (int k = 0; k < BK; k += 16) {
            unsigned a[2][4];
            for (int m = 0; m < 2; ++m) {  // A fragments: rows warp_row + 16 m + g (+8), dims k + 2c (+8)
                const int r = warp_row + 16 * m + g;
                a[m][0] = load_pair(&q_tile[r][k + 2 * c]);
                a[m][1] = load_pair(&q_tile[r + 8][k + 2 * c]);
                a[m][2] = load_pair(&q_tile[r][k + 2 * c + 8]);
                a[m][3] = load_pair(&q_tile[r + 8][k + 2 * c + 8]);
            }
            for (int n = 0; n < 4; ++n) {  // B fragment: key warp_key + 8 n + g, dims k + 2c (+8)
                const int key = warp_key + 8 * n + g;
                const unsigned bfrag[2] = {load_pair(&kv_tile[key][k + 2 * c]), load_pair(&kv_tile[key][k + 2 * c + 8])};
                // acc += q[16 rows, 16 dims] . latent[8 keys, 16 dims]^T
                for (int m = 0; m < 2; ++m) mma_bf16_16816(acc[m][n], a[m], bfrag[0], bfrag[1]);
            }
        }
        __syncthreads();  // the tiles are overwritten by the next step
    }
    for (int m = 0; m < 2; ++m) {
        for (int half = 0; half < 2; ++half) {  // c0, c1 on row g; c2, c3 on row g + 8
            const int r = row0 + warp_row + 16 * m + g + 8 * half;
            if (r >= n_rows) continue;
            float* out_row = scores + ((long long)b * n_rows + r) * n_keys;
            for (int n = 0; n < 4; ++n) {
                for (int e = 0; e < 2; ++e) {
                    const int s_out = key0 + warp_key + 8 * n + 2 * c + e;
                    if (s_out < n_keys) out_row[s_out] = acc[m][n][2 * half + e] * softmax_scale;
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------ kernel 4
// latent_scores_pipelined_bf16: the same mma.sync product, organised so that the tensor cores wait
// for neither the query nor the cache.
//   * The query tile (128 rows x all 576 dims, 144 KiB) is loaded into shared memory once per block
//     and reused for every key tile the block computes: kernel 3 re-reads it for every 64 keys.
//   * Persistent blocks: one block per SM; the work items (batch entry, 128-row block, 128-key tile)
//     are cut into contiguous ranges, one per block, so every SM gets the same number of tiles
//     (+-1) and the query is reloaded only when a range crosses into the next batch entry.
//   * The cache streams through PIPE_STAGES shared-memory buffers of 128 keys x 64 dims filled by
//     cp.async (global -> shared without registers): while the tensor cores work on one buffer, the
//     next PIPE_STAGES - 1 are in flight (64 KiB a SM, enough to cover DRAM latency).
//   * Fragments come from ldmatrix.x4 (four 8 x 8 bf16 matrices, one 16-byte row address per lane).
//     Rows of 64 dims are 128 bytes: without care, the 8 rows an ldmatrix phase reads would all sit
//     in the same banks. The 16-byte chunk j of row r is stored at chunk j ^ (r % 8) (XOR swizzle),
//     which puts those 8 rows in 8 different bank groups; the cp.async writes are permuted the same way.
//   * 8 warps in a 2 x 4 grid: warp w computes rows 64 (w % 2) .. +63 and keys 32 (w / 2) .. +31 of
//     the 128 x 128 tile: 4 A fragments x 4 B fragments = 16 mma per 16 dims, from 6 ldmatrix.x4.
// ldmatrix.x4 hands lane l the pair (row l/4, cols 2 (l%4), +1) of each matrix j in register j, which
// is the mma fragment layout above when the matrices are
//   A: j = 0 (rows 0-7, dims 0-7), 1 (rows 8-15, dims 0-7), 2 (rows 0-7, dims 8-15), 3 (rows 8-15, dims 8-15)
//   B: j = 0 (keys 0-7, dims 0-7), 1 (keys 0-7, dims 8-15), 2 (keys 8-15, dims 0-7), 3 (keys 8-15, dims 8-15)
//      (registers 0, 1 are b0, b1 of the first 8 keys; 2, 3 those of the next 8)
// and lane l supplies the address of row l % 8 of matrix l / 8.
// Dynamic shared memory: the query tile, PIPE_ROWS rows of width_pad bf16 (width_pad = d_c + d_R
// rounded up to PIPE_DIMS), then PIPE_STAGES cache stages of PIPE_STAGE_BYTES:
//     PIPE_ROWS * ceil(width / PIPE_DIMS) * PIPE_ROW_BYTES + PIPE_STAGES * PIPE_STAGE_BYTES
// (576 -> 147456 + 81920 = 229376 bytes; the loader computes it from these #defines and checks it
// against the device's limit).
#define PIPE_ROWS 128    // query rows per tile
#define PIPE_KEYS 128    // keys per tile
#define PIPE_DIMS 64     // dims per pipeline stage
#define PIPE_STAGES 5    // cache buffers in shared memory
#define PIPE_ROW_BYTES (PIPE_DIMS * 2)                // one key's (or query row's) dims of a stage, bf16: 128
#define PIPE_STAGE_BYTES (PIPE_KEYS * PIPE_ROW_BYTES)  // one cache stage: 16 KiB

// byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of `row_bytes`-byte rows
__device__ __forceinline__ int swizzled(int row, int chunk, int row_bytes) {
    return row * row_bytes + ((chunk ^ (row & 7)) << 4);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
latent_scores_pipelined_bf16(const __nv_bfloat16* q_abs, const __nv_bfloat16* q_rope, const __nv_bfloat16* latent,
                             float* scores, int n_rows, int n_keys, int d_c, int d_rope, float softmax_scale,
                             int n_batch) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int width = d_c + d_rope;
    const int n_chunks = (width + PIPE_DIMS - 1) / PIPE_DIMS;  // pipeline stages per key tile
    const int q_row_bytes = n_chunks * PIPE_ROW_BYTES;         // query tile [128][width_pad] bf16
    unsigned char* q_tile = smem;
    unsigned char* kv_tiles = smem + PIPE_ROWS * q_row_bytes;  // PIPE_STAGES x [128 keys][64 dims] bf16
    const int row_blocks = (n_rows + PIPE_ROWS - 1) / PIPE_ROWS, n_tiles = (n_keys + PIPE_KEYS - 1) / PIPE_KEYS;
    const int n_items = n_batch * row_blocks * n_tiles;  // < 2^31 (checked by the loader)
    // this block's contiguous range of work items [first, last)
    const int first = (int)((long long)n_items * blockIdx.x / gridDim.x);
    const int last = (int)((long long)n_items * (blockIdx.x + 1) / gridDim.x);
    const int n_steps = (last - first) * n_chunks;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
    const int warp_row = 64 * (warp % 2), warp_key = 32 * (warp / 2);

    // item -> (batch entry, first query row, first key)
    auto decode_item = [&](int item, int& b, int& row0, int& key0) {
        key0 = (item % n_tiles) * PIPE_KEYS;
        const int rest = item / n_tiles;
        row0 = (rest % row_blocks) * PIPE_ROWS;
        b = rest / row_blocks;
    };
    // query rows row0 .. row0+127 of batch entry b, all dims, zero past n_rows and width
    auto load_query = [&](int b, int row0) {
        const int row_chunks = q_row_bytes / 16;
        for (int idx = tid; idx < PIPE_ROWS * row_chunks; idx += THREADS) {
            const int r = idx / row_chunks, chunk = idx % row_chunks, d = 8 * chunk;
            const long long row = (long long)b * n_rows + row0 + r;
            const bool valid = row0 + r < n_rows && d < width;  // d_c % 8 == 0: a chunk is all q_abs or all q_rope
            const __nv_bfloat16* src = !valid ? q_abs : d < d_c ? q_abs + row * d_c + d : q_rope + row * d_rope + (d - d_c);
            cp_async_16(q_tile + swizzled(r, chunk, q_row_bytes), src, valid ? 16 : 0);
        }
    };
    // pipeline step `step` of this block: keys key0 .. +127, dims 64 (step % n_chunks) .. +63
    auto load_step = [&](int step) {
        int b, row0, key0;
        decode_item(first + step / n_chunks, b, row0, key0);
        const int d0 = (step % n_chunks) * PIPE_DIMS;
        unsigned char* tile = kv_tiles + (step % PIPE_STAGES) * PIPE_STAGE_BYTES;
        for (int idx = tid; idx < PIPE_KEYS * 8; idx += THREADS) {  // 8 chunks of 16 bytes per key
            const int key = idx / 8, chunk = idx % 8, s = key0 + key, d = d0 + 8 * chunk;
            const bool valid = s < n_keys && d < width;
            const __nv_bfloat16* src = valid ? latent + ((long long)b * n_keys + s) * width + d : latent;
            cp_async_16(tile + swizzled(key, chunk, PIPE_ROW_BYTES), src, valid ? 16 : 0);
        }
    };

    int b, row0, key0;
    if (n_steps > 0) {
        decode_item(first, b, row0, key0);
        load_query(b, row0);  // committed with step 0: waited for before step 0 is computed
    }
    for (int step = 0; step < PIPE_STAGES - 1; ++step) {
        if (step < n_steps) load_step(step);
        cp_async_commit();  // (possibly empty) group per step keeps the wait_group count uniform
    }
    float acc[4][4][4] = {};  // [16-row tile m][8-key tile n][c0..c3]
    for (int step = 0; step < n_steps; ++step) {
        const int chunk = step % n_chunks;
        cp_async_wait<PIPE_STAGES - 2>();  // this thread's copies of step `step` have landed ...
        __syncthreads();                   // ... and everyone's; everyone is done with step - 1's buffer
        if (chunk == 0 && step > 0) {      // a new tile: reload the query when the batch entry or row block changes
            int b_new, row0_new;
            decode_item(first + step / n_chunks, b_new, row0_new, key0);
            if (b_new != b || row0_new != row0) {
                b = b_new, row0 = row0_new;
                load_query(b, row0);
                cp_async_commit();
                cp_async_wait<0>();
                __syncthreads();
            }
        }
        if (step + PIPE_STAGES - 1 < n_steps) load_step(step + PIPE_STAGES - 1);  // into the buffer freed at step - 1
        cp_async_commit();

        const unsigned char* tile = kv_tiles + (step % PIPE_STAGES) * PIPE_STAGE_BYTES;
        for (int k = 0; k < PIPE_DIMS; k += 16) {
            unsigned a[4][4], bfrag[2][4];
            for (int m = 0; m < 4; ++m) {  // A: rows warp_row + 16 m + (l % 8) + 8 ((l / 8) % 2), dims k + 8 (l / 16)
                const int r = warp_row + 16 * m + (lane % 8) + 8 * ((lane / 8) % 2);
                ldmatrix_x4(a[m], q_tile + swizzled(r, chunk * 8 + k / 8 + lane / 16, q_row_bytes));
            }
            for (int p = 0; p < 2; ++p) {  // B: keys warp_key + 16 p + (l % 8) + 8 (l / 16), dims k + 8 ((l / 8) % 2)
                const int key = warp_key + 16 * p + (lane % 8) + 8 * (lane / 16);
                ldmatrix_x4(bfrag[p], tile + swizzled(key, k / 8 + (lane / 8) % 2, PIPE_ROW_BYTES));
            }
            for (int m = 0; m < 4; ++m)
                for (int n = 0; n < 4; ++n) {
                    const unsigned bn[2] = {bfrag[n / 2][2 * (n % 2)], bfrag[n / 2][2 * (n % 2) + 1]};
                    // acc += q[16 rows, 16 dims] . latent[8 keys, 16 dims]^T
                    mma_bf16_16816(acc[m][n], a[m], bn[0], bn[1]);
                }
        }
        if (chunk == n_chunks - 1) {  // the tile's 576 dims are summed: write 128 x 128 scores, reset
            int b_out, row0_out, key0_out;
            decode_item(first + step / n_chunks, b_out, row0_out, key0_out);
            for (int m = 0; m < 4; ++m)
                for (int half = 0; half < 2; ++half) {  // c0, c1 on row g; c2, c3 on row g + 8
                    const int r = row0_out + warp_row + 16 * m + g + 8 * half;
                    float* out_row = scores + ((long long)b_out * n_rows + r) * n_keys;
                    for (int n = 0; n < 4; ++n) {
                        const int s = key0_out + warp_key + 8 * n + 2 * c;
                        const float v0 = acc[m][n][2 * half] * softmax_scale, v1 = acc[m][n][2 * half + 1] * softmax_scale;
                        if (r < n_rows && s + 1 < n_keys && (reinterpret_cast<size_t>(out_row + s) & 7) == 0) {
                            __stcs(reinterpret_cast<float2*>(out_row + s), make_float2(v0, v1));  // streaming: not re-read
                        } else if (r < n_rows) {
                            if (s < n_keys) __stcs(out_row + s, v0);
                            if (s + 1 < n_keys) __stcs(out_row + s + 1, v1);
                        }
                    }
                }
            for (int m = 0; m < 4; ++m)
                for (int n = 0; n < 4; ++n)
                    for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.f;
        }
    }
    cp_async_wait<0>();  // no copy may be in flight when the block exits
}
