// Absorbed MLA decode scores over the latent cache (MQA mode, chapter 2):
//
//     score[b, r, s] = (q_abs[b, r] . c_kv[b, s] + q_rope[b, r] . k_rope[b, s]) * softmax_scale
//
// r runs over the R = T * n_h query rows of batch entry b (every head of every new token), s over
// the S cached tokens; q_abs = W^UK^T q^C (d_c values), q_rope (d_R); the cache row
// latent[b, s] = [c_kv (d_c) | k_rope (d_R)] holds d_c + d_R values (576 for V3.2). Seen this way
// it is one batched matrix product per batch entry, [R, 576] x [576, S]: all R rows share the
// same cache, which is what MQA mode buys (one cache read serves all 128 heads).
//
//   kernel 1  decode_scores_naive_f32   one thread per score, reads q and the latent row from
//                                       global memory (latent rows are 2304 B apart: uncoalesced)
//   kernel 2  decode_scores_tiled_f32   64 rows x 64 keys per block, 32 dims of each staged in
//                                       shared memory, 4 x 4 scores per thread (CUDA cores)
//   kernel 3  decode_scores_mma_bf16    bf16 inputs on tensor cores (mma.sync m16n8k16, float32
//                                       accumulation); 128 rows x 64 keys per block, so at decode
//                                       (R = 128 heads) each cache row is read from DRAM once; the
//                                       next 32 dims are loaded into registers while the tensor
//                                       cores work on the current ones
//
// Inputs are contiguous: q_abs [B, R, d_c], q_rope [B, R, d_R], latent [B, S, d_c + d_R];
// output scores float32 [B, R, S]. Grids: kernel 1 (ceil(S/128), R, B) x 128 threads; kernel 2
// (ceil(S/64), ceil(R/64), B) x 256; kernel 3 (ceil(S/64), ceil(R/128), B) x 256. Every tail (R, S,
// and d_c + d_R not multiples of the tile) is zero-filled on load and masked on store. Kernel 3 needs d_c and d_R multiples of
// 16 and 16-byte aligned tensors (asserted by dsa_tutorial.mla.decode_scores_cuda).
// Checked against dsa_tutorial.mla.latent_scores.
#include <cuda_bf16.h>

#define TILE 64       // query rows and cached keys per block (kernels 2, 3)
#define BK 32         // latent dims staged in shared memory per step
#define THREADS 256

// Element d of query row `row` (global row index b * R + r): [q_abs (d_c) | q_rope (d_R)].
__device__ __forceinline__ float query_at(const float* __restrict__ q_abs, const float* __restrict__ q_rope,
                                          long long row, int d, int d_c, int d_rope) {
    return d < d_c ? q_abs[row * d_c + d] : q_rope[row * d_rope + (d - d_c)];
}

// ------------------------------------------------------------------------------------ kernel 1
extern "C" __global__ void __launch_bounds__(128)
decode_scores_naive_f32(const float* q_abs, const float* q_rope, const float* latent, float* scores,
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
decode_scores_tiled_f32(const float* q_abs, const float* q_rope, const float* latent, float* scores,
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
#define MMA_ROWS 128
#define PAD 8  // bf16 of padding per staged row: a 40-element (20-word) stride, conflict-free fragment loads

__device__ __forceinline__ unsigned load_pair(const __nv_bfloat16* p) { return *reinterpret_cast<const unsigned*>(p); }

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 8 bf16 (16 bytes) of query row r (of this block's batch entry), dims d .. d+7; zeros past the ends.
// d_c % 8 == 0, so the 8 dims lie all in q_abs or all in q_rope.
__device__ __forceinline__ uint4 query_chunk(const __nv_bfloat16* q_abs, const __nv_bfloat16* q_rope, long long row,
                                             bool valid, int d, int d_c, int d_rope) {
    if (!valid || d >= d_c + d_rope) return make_uint4(0, 0, 0, 0);
    const __nv_bfloat16* src = d < d_c ? q_abs + row * d_c + d : q_rope + row * d_rope + (d - d_c);
    return *reinterpret_cast<const uint4*>(src);
}

extern "C" __global__ void __launch_bounds__(THREADS)
decode_scores_mma_bf16(const __nv_bfloat16* q_abs, const __nv_bfloat16* q_rope, const __nv_bfloat16* latent,
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
                for (int m = 0; m < 2; ++m) mma_bf16_16816(acc[m][n], a[m], bfrag);
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
