// Sparse MLA decoding over the FP8 latent cache: DeepSeek-V3.2's attention step as deployed, in MQA
// mode over latents that are stored in 656 bytes a token (FlashMLA's "V3.2 FP8 sparse" layout).
// Checked against dsa_tutorial.latent_cache.sparse_mla_decode_fp8 (float32); launched by
// sparse_mla_decode_fp8_cuda (its table SPARSE_MLA_DECODE_FP8_KERNELS).
//
// One token of the cache, 656 bytes (latent_cache.quantize writes it):
//
//   byte 0                              512          528                               656
//        | c^KV as 512 e4m3 values      | 4 float32  | k^R as 64 bf16 values           |
//        | tile 0 | tile 1 | tile 2 | t3| s0 s1 s2 s3|  (not quantised)                |
//   value d < 512 of the latent = e4m3 byte d * s_(d / 128); value 512 + d = bf16 d of k^R.
//
//   q        bfloat16 [rows, h, 576]    rows = B * s_q query tokens, h heads each (64 or 128)
//   kv_cache bytes    [num_blocks][block_size][656], block b at kv_cache + b * block_stride (any stride
//                                       >= block_size * 656: the cache may be a slice of a bigger buffer)
//   indices  int32    [rows, k]         token i lives in block i / block_size, row i % block_size;
//                                       -1, or anything outside [0, num_blocks * block_size) = unused:
//                                       never read, whatever its value
//   out      bfloat16 [rows, h, 512]    o = sum_j p_j kv_j[:512]  (the c^KV part: MLA's latent output)
//   lse      float32  [rows, h]         ln sum_j exp(score_j)
//
//   score_j = softmax_scale * q . kv_j  (576 wide),  p_j = exp(score_j - lse)
//
// A row with no valid index gets out = 0 and lse = +inf (FlashMLA's convention), never NaN.
//
//   kernel 1  sparse_mla_decode_fp8_simt  the specification in CUDA. A block serves 32 heads of one
//             query row (grid: rows x h / 32). It walks the k slots in chunks of 32: one thread per slot
//             finds its token's address and 4 scales, then the block dequantises the 32 latents into
//             shared memory as float32 (e4m3 * scale, bf16 k^R; byte by byte, so any alignment works),
//             computes the 32 x 32 scores (one slot per lane, float32 dot products), and updates each
//             head's running max, sum and 512 outputs (8 threads a head) with the online softmax.
//             Everything is float32 until the final bf16 store. What it leaves on the table: CUDA-core
//             math, and h / 32 blocks per row that each gather and dequantise the same tokens.
//
//   kernel 2  sparse_mla_decode_fp8_mma  tensor cores, the pattern of cuda/sparse_mla_attention.cu's
//             kernel 2 (mma.sync m16n8k16 bf16, float32 accumulation: 64 heads a block share each
//             latent, MQA over the latent) on FP8 tokens. Per tile of 64 slots:
//               1. cp.async gathers the 64 tokens' 656-byte rows (41 x 16 bytes, 4 threads a token,
//                  zeros for unused slots) into a raw stage; the next tile's gather is in flight while
//                  this tile is computed (two raw stages);
//               2. the block dequantises the raw stage into one bf16 tile [64][576] in the XOR-swizzled
//                  layout ldmatrix reads: e4m3 -> f16 (exact) -> float32 * scale -> bf16. Exact for a
//                  power-of-two scale: an e4m3 value has 4 significant bits, bf16 8, and the scale only
//                  moves the exponent (quantize's scales are >= 2^-22, so even the smallest e4m3 subnormal
//                  times a scale, 2^-31, is a normal bf16);
//               3. S = Q K^T, the online softmax (the two warps of a head tile swap row maxima), P in
//                  bf16, O += P V, exactly as in sparse_mla_attention_mma (its header has the details).
//             The consumed raw stage holds P and the row-max exchange, so shared memory is Q 72 KiB +
//             2 raw stages x 41 KiB + the bf16 tile 72 KiB + valid flags 0.5 KiB = 226.5 KiB (one block an
//             SM, the H200 allows 227). P is rounded to bf16 before P V, as in sparse_mla_attention_mma:
//             ~1e-3 of max|out|.
//             Split: when rows x h / 64 blocks fill less than half the SMs (decode at a small batch), the
//             k slots are cut into splits of >= SPLIT_MIN_TILES tiles, as many as fit the SMs in one wave
//             (chosen on the host from the shapes alone: latent_cache.decode_splits), a block each. Every
//             split writes its normalised partial output and its lse (-inf when it saw no valid slot) to
//             a float32 workspace, and sparse_mla_decode_fp8_combine merges them, one warp a (row, head):
//             lse = ln sum_s exp(lse_s), out = sum_s exp(lse_s - lse) o_s, in bf16 (0 and +inf when every
//             split was empty).
//             What it leaves on the table: wgmma (FlashMLA's sm90 kernel uses it, its dequantisation done
//             by a producer warpgroup from global memory through registers, with no raw stage), and the 2
//             blocks of a row at h = 128 each gathering and dequantising the same tokens (FlashMLA's
//             h = 128 kernel runs them as a 2-block cluster, each dequantising half a tile for both).
//
//   kernel 3  sparse_mla_decode_fp8_wgmma  kernel 2's gather, dequantisation and split with Hopper's
//             warpgroup mma (sm_90a only: a trap elsewhere, never launched there), the compute steps of
//             cuda/sparse_mla_prefill.cu's kernel 2: two warpgroups, the tile dequantised into the
//             column-blocked, 128B-swizzled bf16 layout wgmma reads (K-major for S = Q K^T, the same tile
//             N-major for P V); warpgroup w computes S for its 32 keys (wgmma m64n32k16), the row maxima
//             are swapped, P goes to shared memory in bf16, and warpgroup w accumulates O for its 256
//             output values (wgmma m64n256k16). Shared memory: Q 72 KiB + the bf16 tile 72 KiB + 2 raw
//             stages x 41 KiB + 1 KiB to align the base to 1024 bytes = 227 KiB (P and the row exchange in
//             the consumed raw stage; no valid flags: each thread re-reads its keys' indices). Split and
//             combine as kernel 2 (the same workspace, the same combine kernel). The row sums add the
//             float32 p (as the prefill kernel; kernel 2 adds the bf16-rounded p): lse as accurate as
//             float32 allows, out within ~1e-3 of max|out|.
//             What it leaves on the table: every tile passes serial stops (gather wait, dequantise, compute)
//             with the other units idle; one 227 KiB block an SM has nobody else to overlap them with.
//
//   kernel 4  sparse_mla_decode_fp8_ws  kernel 3's math, warp-specialised (FlashMLA's structure for its sm90
//             sparse FP8 kernel): three warpgroups; warpgroup 0, the producer, loads a tile's FP8 rows from
//             global memory into registers, dequantises them and stores the bf16 tile into one of two
//             buffers while warpgroups 1 and 2, the consumers, run kernel 3's S, softmax and P V on the other.
//             The buffers change hands through mbarriers (full / empty); setmaxnreg gives the consumers the
//             registers for O (192 a thread) and leaves the producer 112, for a ring of 8 loads in flight
//             a warp. Shared memory: Q + 2 bf16 buffers + P + exchanges and flags = 226 KiB (no raw stage:
//             the rows pass through registers). Same arguments, split and combine as kernel 3, and the same
//             results bit for bit (the same tile values, the same wgmma sequence, the same softmax
//             arithmetic). The default where it runs (compute capability 9.0).
//             What it leaves on the table: the producer is still the slower side (Nsight Compute: the
//             consumers spend a fifth of their time waiting on "full"; the producer's stalls are mostly its
//             loads' latency, ~1300 instructions a warp a tile); the two head groups of a row each
//             convert its tokens; the grid is 3.9 waves of one block an SM (the last wave 88% full).
//
// Memory safety, for any input values: an index is used only when 0 <= i and i / block_size <
// num_blocks (so i < num_blocks * block_size, without overflow); every read of the cache is then
// inside block i / block_size; unused slots read nothing (cp.async with 0 source bytes, or no load, or no
// prefetch).
// All addresses are computed in 64 bits. The host passes num_blocks >= 1 (an empty cache is
// answered without a launch).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common.cuh"  // NEG_INF, smem_address, cp_async_*, ldmatrix_x4 (and _trans), mma_bf16_16816_free,
                       // e4m3x4_to_f16x4, quad_sum
#include "wgmma.cuh"   // WGMMA_AVAILABLE, blocked, wgmma_desc (and _n_major), the bf16 wgmma, fences (kernel 3)

#define D_NOPE 512                          // c^KV: quantised
#define D_ROPE 64                           // k^R: bf16
#define D_QK (D_NOPE + D_ROPE)              // 576: the width of q . kv
#define QUANT_TILE 128                      // c^KV values per scale
#define N_SCALES (D_NOPE / QUANT_TILE)      // 4
#define SCALES_AT D_NOPE                    // byte 512: the float32 scales
#define ROPE_AT (SCALES_AT + 4 * N_SCALES)  // byte 528: k^R
#define TOKEN_BYTES (ROPE_AT + 2 * D_ROPE)  // 656 bytes a token
#define MAX_HEADS 128                       // the heads a query row may have (a multiple of MMA_HEADS)
#define POS_INF (__int_as_float(0x7f800000))
#define LN2 0.6931471805599453f

// The address of token s's row, or nullptr when s is not in [0, num_blocks * block_size).
__device__ __forceinline__ const unsigned char* token_row(const unsigned char* kv_cache, int s,
                                                          int num_blocks, int block_size,
                                                          long long block_stride) {
    if (s < 0 || s / block_size >= num_blocks) return nullptr;
    return kv_cache + (long long)(s / block_size) * block_stride + (long long)(s % block_size) * TOKEN_BYTES;
}

// ------------------------------------------------------------------------------------ kernel 1

#define SIMT_HEADS 32                             // heads per block
#define SIMT_CHUNK 32                             // slots per step
#define SIMT_THREADS 256
#define SIMT_ROW (D_QK + 1)                       // float32 per shared row: 577, an odd stride, so 32 lanes
                                                  // reading 32 rows at one column hit 32 different banks
#define SIMT_PARTS (SIMT_THREADS / SIMT_HEADS)    // 8 threads share a head's 512 outputs
#define SIMT_VALUES (D_NOPE / SIMT_PARTS)         // 64 output values a thread: part + 8 i
// kernel 1's dynamic shared memory: queries and latents [.][SIMT_ROW] f32, scores [HEADS][CHUNK] f32, then
// per slot its row's byte offset (8 bytes, -1 unused) and its 4 scales: 149 KiB
#define SIMT_FLOATS ((SIMT_HEADS + SIMT_CHUNK) * SIMT_ROW + SIMT_HEADS * SIMT_CHUNK)
#define SIMT_SMEM_BYTES (SIMT_FLOATS * 4 + SIMT_CHUNK * (8 + 4 * N_SCALES))

// One e4m3 byte as a float (exact: every e4m3 value is an f16 value).
__device__ __forceinline__ float e4m3_to_float(unsigned char byte) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)byte, __NV_E4M3)));
}

// Four bytes at any address, little end first, as the float32 they encode.
__device__ __forceinline__ float float_from_bytes(const unsigned char* p) {
    return __uint_as_float((unsigned)p[0] | ((unsigned)p[1] << 8) | ((unsigned)p[2] << 16) |
                           ((unsigned)p[3] << 24));
}

// Two bytes at any address, little end first, as the bf16 they encode, as a float (exact).
__device__ __forceinline__ float bf16_from_bytes(const unsigned char* p) {
    return __uint_as_float(((unsigned)p[0] << 16) | ((unsigned)p[1] << 24));
}

extern "C" __global__ void __launch_bounds__(SIMT_THREADS)
sparse_mla_decode_fp8_simt(const __nv_bfloat16* __restrict__ q, const unsigned char* __restrict__ kv_cache,
                           const int* __restrict__ indices, __nv_bfloat16* __restrict__ out,
                           float* __restrict__ lse, int n_heads, int k, int num_blocks, int block_size,
                           long long block_stride, float softmax_scale) {
    extern __shared__ __align__(16) unsigned char simt_smem[];
    float* q_s = reinterpret_cast<float*>(simt_smem);                                   // [HEADS][SIMT_ROW]
    float* kv_s = q_s + SIMT_HEADS * SIMT_ROW;                                          // [CHUNK][SIMT_ROW]
    float* score_s = kv_s + SIMT_CHUNK * SIMT_ROW;                                      // [HEADS][CHUNK]
    long long* at_s = reinterpret_cast<long long*>(score_s + SIMT_HEADS * SIMT_CHUNK);  // [CHUNK]
    float* scale_s = reinterpret_cast<float*>(at_s + SIMT_CHUNK);                       // [CHUNK][N_SCALES]

    const int row = blockIdx.x, h0 = blockIdx.y * SIMT_HEADS;  // row = b * s_q + t
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int* index_row = indices + (size_t)row * k;

    // the block's 32 queries as float32, zeros for heads past n_h
    for (int i = tid; i < SIMT_HEADS * D_QK; i += SIMT_THREADS) {
        const int hh = i / D_QK, d = i % D_QK;
        q_s[hh * SIMT_ROW + d] =
            h0 + hh < n_heads ? __bfloat162float(q[((size_t)row * n_heads + h0 + hh) * D_QK + d]) : 0.f;
    }

    // this thread's share of the output: head `head`, values part + 8 i
    const int head = tid / SIMT_PARTS, part = tid % SIMT_PARTS;
    float o[SIMT_VALUES];
#pragma unroll
    for (int i = 0; i < SIMT_VALUES; ++i) o[i] = 0.f;
    float running_max = NEG_INF, running_sum = 0.f;

    for (int j0 = 0; j0 < k; j0 += SIMT_CHUNK) {
        __syncthreads();  // the previous chunk is fully used (and q_s is written, the first time)
        if (tid < SIMT_CHUNK) {  // slot j0 + tid: its token's byte offset (-1: unused) and its 4 scales
            const int s = j0 + tid < k ? index_row[j0 + tid] : -1;
            const unsigned char* token = token_row(kv_cache, s, num_blocks, block_size, block_stride);
            at_s[tid] = token ? (long long)(token - kv_cache) : -1;
#pragma unroll
            for (int c = 0; c < N_SCALES; ++c)
                scale_s[tid * N_SCALES + c] = token ? float_from_bytes(token + SCALES_AT + 4 * c) : 0.f;
        }
        __syncthreads();
        // the chunk's latents, dequantised: kv[d] = e4m3[d] * s_(d / 128) for d < 512, k^R[d - 512] after;
        // zeros for unused slots
        for (int i = tid; i < SIMT_CHUNK * D_QK; i += SIMT_THREADS) {
            const int jj = i / D_QK, d = i % D_QK;
            const long long at = at_s[jj];
            float v = 0.f;
            if (at >= 0) {
                const unsigned char* token = kv_cache + at;
                v = d < D_NOPE ? e4m3_to_float(token[d]) * scale_s[jj * N_SCALES + d / QUANT_TILE]
                               : bf16_from_bytes(token + ROPE_AT + 2 * (d - D_NOPE));
            }
            kv_s[jj * SIMT_ROW + d] = v;
        }
        __syncthreads();
        // scores: warp w takes heads 4w .. 4w + 3, lane jj takes slot jj of the chunk
        {
            float dot[SIMT_HEADS / 8] = {0.f, 0.f, 0.f, 0.f};
            const float* kv_row = kv_s + lane * SIMT_ROW;
            for (int d = 0; d < D_QK; ++d) {
                const float c = kv_row[d];
#pragma unroll
                for (int x = 0; x < SIMT_HEADS / 8; ++x)
                    dot[x] += q_s[(warp * (SIMT_HEADS / 8) + x) * SIMT_ROW + d] * c;
            }
#pragma unroll
            for (int x = 0; x < SIMT_HEADS / 8; ++x)  // score = softmax_scale q . kv; -inf for unused slots
                score_s[(warp * (SIMT_HEADS / 8) + x) * SIMT_CHUNK + lane] =
                    at_s[lane] >= 0 ? dot[x] * softmax_scale : NEG_INF;
        }
        __syncthreads();
        // online softmax for this thread's head (its 8 threads do the same arithmetic)
        float chunk_max = NEG_INF;
        for (int jj = 0; jj < SIMT_CHUNK; ++jj) chunk_max = fmaxf(chunk_max, score_s[head * SIMT_CHUNK + jj]);
        const float new_max = fmaxf(running_max, chunk_max);
        if (new_max == NEG_INF) continue;  // nothing valid yet for this head: o and the sum stay 0
        const float alpha = expf(running_max - new_max);  // rescale what was summed under the old max
        running_sum *= alpha;
#pragma unroll
        for (int i = 0; i < SIMT_VALUES; ++i) o[i] *= alpha;
        for (int jj = 0; jj < SIMT_CHUNK; ++jj) {
            const float p = expf(score_s[head * SIMT_CHUNK + jj] - new_max);  // 0 for unused slots
            running_sum += p;
            const float* kv_row = kv_s + jj * SIMT_ROW + part;
#pragma unroll
            for (int i = 0; i < SIMT_VALUES; ++i) o[i] += p * kv_row[SIMT_PARTS * i];  // o += p kv[:512]
        }
        running_max = new_max;
    }
    // out = o / sum_j p_j (0 when nothing was selected); lse = max + ln sum (+inf when nothing was)
    if (h0 + head < n_heads) {
        const size_t pair = (size_t)row * n_heads + h0 + head;
        const float inv_sum = running_sum > 0.f ? 1.f / running_sum : 0.f;
        __nv_bfloat16* out_row = out + pair * D_NOPE + part;
#pragma unroll
        for (int i = 0; i < SIMT_VALUES; ++i) out_row[SIMT_PARTS * i] = __float2bfloat16(o[i] * inv_sum);
        if (part == 0) lse[pair] = running_sum > 0.f ? running_max + logf(running_sum) : POS_INF;
    }
}

// ------------------------------------------------------------------------------------ kernel 2
//
// Fragment layouts and ldmatrix: as in cuda/sparse_mla_attention.cu (and cuda/common.cuh). Shared rows
// are 16-byte chunks; chunk c of row r sits at position c ^ (r % 8) (an XOR swizzle), so the 8 rows one
// ldmatrix phase reads at the same logical chunk fall in 8 different bank groups.

#define MMA_HEADS 64                               // heads per block: 4 head tiles of 16
#define MMA_TILE 64                                // slots per tile
#define MMA_THREADS 256                            // 8 warps: 4 head tiles x 2 halves
#define L_CHUNKS (D_QK / 8)                        // 72 chunks of 8 bf16 in a dequantised latent (or a query)
#define NOPE_CHUNKS (D_NOPE / 8)                   // the first 64 come from e4m3 bytes; the last 8 are k^R
#define RAW_CHUNKS (TOKEN_BYTES / 16)              // 41 chunks of 16 bytes in a token's row
#define LOADERS (MMA_THREADS / MMA_TILE)           // 4 threads gather one token
#define P_CHUNKS (MMA_TILE / 8)                    // 8 chunks in a 64-value row of P
#define Q_SMEM_BYTES (MMA_HEADS * D_QK * 2)        // 72 KiB
#define RAW_STAGE_BYTES (MMA_TILE * TOKEN_BYTES)   // 41 KiB: a tile's rows as gathered
#define KV_SMEM_BYTES (MMA_TILE * D_QK * 2)        // 72 KiB: the tile dequantised
#define P_BYTES (MMA_HEADS * MMA_TILE * 2)         // P in bf16, kept in the consumed raw stage, then
                                                   // the row-max exchange [2][MMA_HEADS] f32 after it
// kernel 2's dynamic shared memory: Q, 2 raw stages, the bf16 tile, valid flags [2][MMA_TILE] i32: 226.5 KiB
#define MMA_SMEM_BYTES (Q_SMEM_BYTES + 2 * RAW_STAGE_BYTES + KV_SMEM_BYTES + 2 * MMA_TILE * 4)
#define SPLIT_MIN_TILES 2                          // a split takes at least 2 tiles (128 slots): below
                                                   // that, its partial output (128 KiB) outweighs its reads
#define COMBINE_WARPS 4                            // combine kernel: one warp a (row, head)
#define COMBINE_THREADS (32 * COMBINE_WARPS)

// bf16 offset of chunk `chunk` of row `row` in a swizzled array of `chunks` chunks a row (as in
// sparse_mla_attention.cu)
__device__ __forceinline__ int swizzled(int row, int chunk, int chunks) {
    return (row * chunks + (chunk ^ (row & 7))) * 8;
}

// Eight e4m3 values (8 bytes, the lowest address in the low byte of lo) times `scale2` (the block's scale in
// both halves), as 8 bf16 (16 bytes, in order): e4m3 -> f16 -> float32 -> bf16 is exact (an e4m3 value has 4
// significant bits), and the bf16 product with a power-of-two scale is exact too (it only moves the exponent):
// the same bits as rounding float32(value) * scale to bf16, in 2.5 instructions a value instead of 3 (one
// bf16x2 multiply a pair replaces two float32 multiplies). The cache's scales are powers of two (ue8m0).
__device__ __forceinline__ uint4 dequantize8(uint2 bytes, __nv_bfloat162 scale2) {
    unsigned h[4], w[4];
    e4m3x4_to_f16x4(bytes.x, h[0], h[1]);
    e4m3x4_to_f16x4(bytes.y, h[2], h[3]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h[j]));
        const __nv_bfloat162 b = __hmul2(__floats2bfloat162_rn(f.x, f.y), scale2);
        w[j] = *reinterpret_cast<const unsigned*>(&b);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Kernels 2, 3 and 4: the block's query row and its first head h0. The grid's x runs over (row, head
// group) with the head group fastest, so the n_heads / MMA_HEADS blocks of one row are launched one after
// the other and run side by side: the row's tokens come from DRAM once and the other head groups find
// them in L2 (with the row fastest, the two head halves of a row ran a whole wave of blocks apart, and
// each gathered the row's 2048 x 656 bytes from DRAM).
__device__ __forceinline__ void block_row_and_heads(int n_heads, int& row, int& h0, int& n_rows) {
    const int groups = n_heads / MMA_HEADS;
    row = blockIdx.x / groups;
    h0 = (blockIdx.x % groups) * MMA_HEADS;
    n_rows = gridDim.x / groups;
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
sparse_mla_decode_fp8_mma(const __nv_bfloat16* __restrict__ q, const unsigned char* __restrict__ kv_cache,
                          const int* __restrict__ indices, __nv_bfloat16* __restrict__ out,
                          float* __restrict__ lse, float* __restrict__ o_partial,
                          float* __restrict__ lse_partial, int n_heads, int k, int num_blocks, int block_size,
                          long long block_stride, int tiles_per_split, float softmax_scale) {
    extern __shared__ __align__(16) unsigned char decode_smem[];
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(decode_smem);                  // [HEADS][576] swz.
    unsigned char* raw_s = decode_smem + Q_SMEM_BYTES;                                    // [2][TILE][656]
    __nv_bfloat16* kv_s = reinterpret_cast<__nv_bfloat16*>(raw_s + 2 * RAW_STAGE_BYTES);  // [TILE][576] swz.
    int* valid_s = reinterpret_cast<int*>(kv_s + MMA_TILE * D_QK);                        // [2 stages][TILE]

    // grid: (rows x head groups, 1, splits); gridDim.z == 1: this block writes out and lse itself
    int row, h0, n_rows;
    block_row_and_heads(n_heads, row, h0, n_rows);
    const int split = blockIdx.z;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int mt = warp % 4, half = warp / 4;  // head tile (heads h0 + 16 mt ..) and key / output half
    const int g = lane / 4, t = lane % 4;      // the fragment coordinates of this lane
    const int* index_row = indices + (size_t)row * k;

    // the block's 64 queries [576], zeros for heads past n_h
    for (int i = tid; i < MMA_HEADS * L_CHUNKS; i += MMA_THREADS) {
        const int r = i / L_CHUNKS, c = i % L_CHUNKS;
        const bool inside = h0 + r < n_heads;
        const __nv_bfloat16* src = q + ((size_t)row * n_heads + (inside ? h0 + r : 0)) * D_QK + c * 8;
        cp_async_16(q_s + swizzled(r, c, L_CHUNKS), src, inside ? 16 : 0);
    }
    // gather tile `tile` into raw stage `stage`: thread (r, part) copies chunks part, part + 4, .. of slot
    // r's token (zeros when unused); valid_s records which slots hold a token
    auto load_tile = [&](int tile, int stage) {
        const int r = tid / LOADERS, part = tid % LOADERS;
        const int j = tile * MMA_TILE + r;
        const unsigned char* token =
            token_row(kv_cache, j < k ? __ldg(index_row + j) : -1, num_blocks, block_size, block_stride);
        const unsigned char* src = token ? token : kv_cache;  // unused: 0 bytes read, at an in-bounds address
        unsigned char* dst = raw_s + stage * RAW_STAGE_BYTES + r * TOKEN_BYTES;
        for (int c = part; c < RAW_CHUNKS; c += LOADERS)
            cp_async_16(dst + 16 * c, src + 16 * c, token ? 16 : 0);
        if (part == 0) valid_s[stage * MMA_TILE + r] = token != nullptr;
    };
    // raw stage `stage` -> kv_s: chunk c < 64 of a row = 8 e4m3 bytes times their tile's scale; chunks
    // 64 .. 71 = k^R's 16-byte chunks as they are
    auto dequantize_tile = [&](int stage) {
        const unsigned char* raw = raw_s + stage * RAW_STAGE_BYTES;
        for (int i = tid; i < MMA_TILE * L_CHUNKS; i += MMA_THREADS) {
            const int r = i / L_CHUNKS, c = i % L_CHUNKS;
            const unsigned char* token = raw + r * TOKEN_BYTES;
            const float* scales = reinterpret_cast<const float*>(token + SCALES_AT);
            const uint4 values =
                c < NOPE_CHUNKS
                    ? dequantize8(*reinterpret_cast<const uint2*>(token + 8 * c),
                                  __float2bfloat162_rn(scales[8 * c / QUANT_TILE]))
                    : *reinterpret_cast<const uint4*>(token + ROPE_AT + 16 * (c - NOPE_CHUNKS));
            *reinterpret_cast<uint4*>(kv_s + swizzled(r, c, L_CHUNKS)) = values;
        }
    };

    // this warp's output: heads 16 mt + g (c0, c1) and + 8 (c2, c3), values 256 half + 8 n + 2t, +1
    float o[32][4];
#pragma unroll
    for (int n = 0; n < 32; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    // running max and (this warp's partial) sum of rows g and g + 8, in the base-2 domain
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};
    const float scale_log2 = softmax_scale * 1.4426950408889634f;  // exp(x) = 2^(x log2 e)

    // this split's tiles [first, last) of the row's ceil(k / 64)
    const int n_tiles = (k + MMA_TILE - 1) / MMA_TILE;
    const int first = split * tiles_per_split, last = min(first + tiles_per_split, n_tiles);
    if (first < last) load_tile(first, 0);
    cp_async_commit();  // the queries and the first tile
    for (int tile = first; tile < last; ++tile) {
        const int stage = (tile - first) % 2;
        cp_async_wait<0>();
        __syncthreads();  // (A) the tile is in raw stage `stage`; every warp is done with the previous tile
        if (tile + 1 < last) load_tile(tile + 1, stage ^ 1);  // in flight during everything below
        cp_async_commit();
        dequantize_tile(stage);
        __syncthreads();  // (D) kv_s holds the tile in bf16; raw stage `stage` is free: P and row_s go there
        unsigned char* free_stage = raw_s + stage * RAW_STAGE_BYTES;
        __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(free_stage);  // [HEADS][TILE] swizzled
        float* row_s = reinterpret_cast<float*>(free_stage + P_BYTES);      // [2 halves][HEADS]

        // 1. score = Q K^T for heads 16 mt .. +16, keys 32 half .. +32 of the tile: [16, 32]
        float acc[4][4];
#pragma unroll
        for (int n = 0; n < 4; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll 2
        for (int kk = 0; kk < D_QK / 16; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a, q_s + swizzled(16 * mt + lane % 16, 2 * kk + lane / 16, L_CHUNKS));
#pragma unroll
            for (int np = 0; np < 2; ++np) {  // two n-tiles of 8 keys per ldmatrix
                unsigned kb[4];
                ldmatrix_x4(kb, kv_s + swizzled(32 * half + 16 * np + lane % 8 + 8 * (lane / 16),
                                                2 * kk + (lane / 8) % 2, L_CHUNKS));
                mma_bf16_16816_free(acc[2 * np], a, kb[0], kb[1]);
                mma_bf16_16816_free(acc[2 * np + 1], a, kb[2], kb[3]);
            }
        }
        // score_j,i = softmax_scale (q_i . kv_j) (times log2 e), -inf for unused slots; row maxima
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
        // 3. p_j,i = exp(score - m_new), rounded to bf16 (the A operand of P V); the sums add the same values
#pragma unroll
        for (int n = 0; n < 4; ++n) {
            const __nv_bfloat162 top =
                __floats2bfloat162_rn(exp2f(acc[n][0] - m_use[0]), exp2f(acc[n][1] - m_use[0]));
            const __nv_bfloat162 bottom =
                __floats2bfloat162_rn(exp2f(acc[n][2] - m_use[1]), exp2f(acc[n][3] - m_use[1]));
            const float2 top_f = __bfloat1622float2(top), bottom_f = __bfloat1622float2(bottom);
            row_sum[0] += top_f.x + top_f.y;
            row_sum[1] += bottom_f.x + bottom_f.y;
            const int prow = 16 * mt + g, chunk = 4 * half + n;  // keys 32 half + 8 n + 2t, +1
            *reinterpret_cast<__nv_bfloat162*>(p_s + swizzled(prow, chunk, P_CHUNKS) + 2 * t) = top;
            *reinterpret_cast<__nv_bfloat162*>(p_s + swizzled(prow + 8, chunk, P_CHUNKS) + 2 * t) = bottom;
        }
#pragma unroll
        for (int n = 0; n < 32; ++n) {  // rescale what was accumulated under the old max
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
        __syncthreads();  // (C) the whole 64 x 64 P is in p_s

        // 4. o += P V: [16, 64] x [64, 256], V = the c^KV part of the tile's latents, values 256 half ..
#pragma unroll
        for (int kk = 0; kk < MMA_TILE / 16; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a, p_s + swizzled(16 * mt + lane % 16, 2 * kk + lane / 16, P_CHUNKS));
#pragma unroll
            for (int np = 0; np < 16; ++np) {  // two n-tiles of 8 output values per ldmatrix
                unsigned vb[4];
                ldmatrix_x4_trans(vb, kv_s + swizzled(16 * kk + lane % 8 + 8 * ((lane / 8) % 2),
                                                      32 * half + 2 * np + lane / 16, L_CHUNKS));
                mma_bf16_16816_free(o[2 * np], a, vb[0], vb[1]);
                mma_bf16_16816_free(o[2 * np + 1], a, vb[2], vb[3]);
            }
        }
    }
    cp_async_wait<0>();  // only the queries (no tile at all) or empty groups can be left in flight
    __syncthreads();     // every warp is done with the last tile: kv_s is free for the row sums

    // sum_j p_j over all 64 keys of every tile: this lane's columns, its quad's, then the partner warp's
    float* sum_s = reinterpret_cast<float*>(kv_s);  // [2 halves][MMA_HEADS]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    }
    if (t == 0) {
        sum_s[half * MMA_HEADS + 16 * mt + g] = row_sum[0];
        sum_s[half * MMA_HEADS + 16 * mt + g + 8] = row_sum[1];
    }
    __syncthreads();
    // out = o / sum (0 when nothing was selected); lse = ln 2 (m + log2 sum): +inf (final) or -inf (a split's
    // partial, so that it weighs nothing in the combine) when nothing was selected
    const bool whole = gridDim.z == 1;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int head = h0 + 16 * mt + g + 8 * r;
        const float total = row_sum[r] + sum_s[(half ^ 1) * MMA_HEADS + 16 * mt + g + 8 * r];
        const float inv_sum = total > 0.f ? 1.f / total : 0.f;
        const float row_lse = total > 0.f ? (row_max[r] + log2f(total)) * LN2 : whole ? POS_INF : NEG_INF;
        if (head < n_heads) {
            const size_t pair = (size_t)row * n_heads + head;
            if (whole) {
                __nv_bfloat16* out_row = out + pair * D_NOPE + 256 * half + 2 * t;
#pragma unroll
                for (int n = 0; n < 32; ++n)
                    *reinterpret_cast<__nv_bfloat162*>(out_row + 8 * n) =
                        __floats2bfloat162_rn(o[n][2 * r] * inv_sum, o[n][2 * r + 1] * inv_sum);
                if (half == 0 && t == 0) lse[pair] = row_lse;
            } else {
                const size_t slot = (size_t)split * n_rows * n_heads + pair;  // [split][row][head]
                float* o_row = o_partial + slot * D_NOPE + 256 * half + 2 * t;
#pragma unroll
                for (int n = 0; n < 32; ++n)
                    *reinterpret_cast<float2*>(o_row + 8 * n) =
                        make_float2(o[n][2 * r] * inv_sum, o[n][2 * r + 1] * inv_sum);
                if (half == 0 && t == 0) lse_partial[slot] = row_lse;
            }
        }
    }
}

// ------------------------------------------------------------------------------------ kernel 3
//
// Kernel 2's gather, dequantisation and split with the compute steps of sparse_mla_prefill_wgmma
// (cuda/sparse_mla_prefill.cu, kernel 2, whose header explains the tiles, descriptors and fragments).
// Two warpgroups, one query row and 64 heads a block, tiles of 64 slots:
//   1. cp.async gathers the next tile's 656-byte rows into a raw stage while this tile is computed;
//   2. the block dequantises the raw stage into the bf16 tile [64][576], column-blocked and 128B-swizzled
//      (blocked() of cuda/wgmma.cuh: 9 blocks of 64 values), the layout wgmma reads K-major for
//      S = Q K^T and N-major (transposed) for P V; Q is in the same layout;
//   3. warpgroup w: S_w = Q K_w^T for its 32 keys (36 wgmma m64n32k16), row maxima swapped between the
//      warpgroups, P_w = exp(S_w - m) in bf16 into its 32 columns of the 64 x 64 P tile;
//   4. warpgroup w: O_w += P V[:, 256 w ..] (4 wgmma m64n256k16, V N-major from the bf16 tile).
// Shared memory, WGMMA_SMEM_ALIGN-byte aligned inside: Q 72 KiB, the bf16 tile 72 KiB, 2 raw stages x 41 KiB
// (41 KiB = 41 x 1024: both start 1024-byte aligned); P (8 KiB) and the row exchange [2][64] f32 go into
// the consumed raw stage (as in kernel 2). 226 KiB + the 1 KiB alignment slack = 227 KiB, the H200's
// limit: there is no room for kernel 2's valid flags, so each thread tests its own 8 keys' indices (read
// again, from L1) while the tensor cores compute S. Precision as in the prefill kernel: scores are exact
// bf16 products summed in float32, p rounded to bf16 for P V, the row sums add the float32 p.
// Ordering as in the prefill kernel: generic-proxy writes (cp.async of Q, the dequantised tile, P) are
// fenced (fence.proxy.async) by each writer, then a barrier precedes the wgmma that reads them; the tile,
// P and a raw stage are rewritten only after every warpgroup has waited for the products that read them
// (wgmma_wait<0>) and passed a barrier.

#define WGMMA_THREADS 256                           // two warpgroups
// kernel 3's carve: Q, the bf16 tile, 2 raw stages (P and the row exchange in the consumed one): 226 KiB
#define WGMMA_CARVE_BYTES (Q_SMEM_BYTES + KV_SMEM_BYTES + 2 * RAW_STAGE_BYTES)
// what the launch asks for: the carve plus the slack to round the base up to WGMMA_SMEM_ALIGN: 227 KiB
#define WGMMA_DYNAMIC_SMEM (WGMMA_SMEM_ALIGN + WGMMA_CARVE_BYTES)
static_assert(MMA_TILE * 128 == WGMMA_BLOCK_BYTES && MMA_HEADS == MMA_TILE, "64-row tiles, P square");
static_assert(WGMMA_THREADS == MMA_THREADS, "4 threads gather a token (LOADERS), as in kernel 2");
static_assert(Q_SMEM_BYTES % WGMMA_SMEM_ALIGN == 0 && KV_SMEM_BYTES % WGMMA_SMEM_ALIGN == 0 &&
                  RAW_STAGE_BYTES % WGMMA_SMEM_ALIGN == 0, "every tile, and P, starts 1024-byte aligned");
static_assert(P_BYTES + 2 * MMA_HEADS * 4 <= RAW_STAGE_BYTES, "P and the row exchange fit a raw stage");
static_assert(WGMMA_DYNAMIC_SMEM <= 227 * 1024, "one block an SM on an H100 / H200");

extern "C" __global__ void __launch_bounds__(WGMMA_THREADS, 1)
sparse_mla_decode_fp8_wgmma(const __nv_bfloat16* __restrict__ q, const unsigned char* __restrict__ kv_cache,
                            const int* __restrict__ indices, __nv_bfloat16* __restrict__ out,
                            float* __restrict__ lse, float* __restrict__ o_partial,
                            float* __restrict__ lse_partial, int n_heads, int k, int num_blocks, int block_size,
                            long long block_stride, int tiles_per_split, float softmax_scale) {
#if WGMMA_AVAILABLE
    extern __shared__ unsigned char wgmma_smem_raw[];
    unsigned char* q_s = align_smem(wgmma_smem_raw);
    unsigned char* kv_s = q_s + Q_SMEM_BYTES;     // the bf16 tile [64][576], column-blocked
    unsigned char* raw_s = kv_s + KV_SMEM_BYTES;  // [2][TILE][656] as gathered

    // grid: (rows x head groups, 1, splits); gridDim.z == 1: this block writes out and lse itself
    int row, h0, n_rows;
    block_row_and_heads(n_heads, row, h0, n_rows);
    const int split = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int* index_row = indices + (size_t)row * k;
    // slot j is used when 0 <= s and s / block_size < num_blocks, i.e. s < num_blocks * block_size (what
    // token_row tests, without its division)
    const long long n_tokens = (long long)num_blocks * block_size;

    // the block's 64 queries [576], column-blocked; zeros for heads past n_h
    for (int i = tid; i < MMA_HEADS * L_CHUNKS; i += WGMMA_THREADS) {
        const int r = i / L_CHUNKS, c = i % L_CHUNKS;
        const bool inside = h0 + r < n_heads;
        const __nv_bfloat16* src = q + ((size_t)row * n_heads + (inside ? h0 + r : 0)) * D_QK + c * 8;
        cp_async_16(q_s + blocked(r, c), src, inside ? 16 : 0);
    }
    // gather tile `tile` into raw stage `stage`, as kernel 2 does (zeros for unused slots)
    auto load_tile = [&](int tile, int stage) {
        const int r = tid / LOADERS, part = tid % LOADERS;
        const int j = tile * MMA_TILE + r;
        const unsigned char* token =
            token_row(kv_cache, j < k ? __ldg(index_row + j) : -1, num_blocks, block_size, block_stride);
        const unsigned char* src = token ? token : kv_cache;  // unused: 0 bytes read, at an in-bounds address
        unsigned char* dst = raw_s + stage * RAW_STAGE_BYTES + r * TOKEN_BYTES;
        for (int c = part; c < RAW_CHUNKS; c += LOADERS)
            cp_async_16(dst + 16 * c, src + 16 * c, token ? 16 : 0);
    };
    // raw stage `stage` -> kv_s (as kernel 2, into the column-blocked layout)
    auto dequantize_tile = [&](int stage) {
        const unsigned char* raw = raw_s + stage * RAW_STAGE_BYTES;
        for (int i = tid; i < MMA_TILE * L_CHUNKS; i += WGMMA_THREADS) {
            const int r = i / L_CHUNKS, c = i % L_CHUNKS;
            const unsigned char* token = raw + r * TOKEN_BYTES;
            const float* scales = reinterpret_cast<const float*>(token + SCALES_AT);
            const uint4 values =
                c < NOPE_CHUNKS
                    ? dequantize8(*reinterpret_cast<const uint2*>(token + 8 * c),
                                  __float2bfloat162_rn(scales[8 * c / QUANT_TILE]))
                    : *reinterpret_cast<const uint4*>(token + ROPE_AT + 16 * (c - NOPE_CHUNKS));
            *reinterpret_cast<uint4*>(kv_s + blocked(r, c)) = values;
        }
    };

    // this thread's output: heads 16 warp + g (o[4c], o[4c + 1]) and + 8 (o[4c + 2, 3]), values
    // 256 wg + 8c + 2t, +1 (c < 32)
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};  // base-2 domain, this thread's part
    const float scale_log2 = softmax_scale * 1.4426950408889634f;     // exp(x) = 2^(x log2 e)
    const unsigned q_address = smem_address(q_s), kv_address = smem_address(kv_s);
    const unsigned raw_address = smem_address(raw_s);

    // this split's tiles [first, last) of the row's ceil(k / 64)
    const int n_tiles = (k + MMA_TILE - 1) / MMA_TILE;
    const int first = split * tiles_per_split, last = min(first + tiles_per_split, n_tiles);
    if (first < last) load_tile(first, 0);
    cp_async_commit();  // the queries and the first tile
    for (int tile = first; tile < last; ++tile) {
        const int stage = (tile - first) % 2;
        cp_async_wait<0>();
        fence_proxy_async();  // this thread's copies of Q -> visible to the tensor cores' reads
        __syncthreads();      // (A) the tile is in raw stage `stage`; every warpgroup is done with the last tile
        if (tile + 1 < last) load_tile(tile + 1, stage ^ 1);  // in flight during everything below
        cp_async_commit();
        dequantize_tile(stage);
        fence_proxy_async();  // this thread's part of the bf16 tile -> visible to the tensor cores' reads
        __syncthreads();      // (D) kv_s holds the tile; raw stage `stage` is free: P and row_s go there
        unsigned char* p_s = raw_s + stage * RAW_STAGE_BYTES;        // [64 heads][64 keys] bf16, one block
        float* row_s = reinterpret_cast<float*>(p_s + P_BYTES);      // [2 warpgroups][64]
        const unsigned p_address = raw_address + stage * RAW_STAGE_BYTES;

        // 1. S_wg = Q K^T for the 64 heads x keys 32 wg .. 32 wg + 31 of the tile: 36 k-steps of 16
        float acc[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[i] = 0.f;
        const unsigned keys_address = kv_address + 32 * wg * 128;  // row 32 wg: 4 whole atoms on
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < D_QK / 16; ++s) {
            const unsigned step = (s / 4) * WGMMA_BLOCK_BYTES + (s % 4) * 32;
            wgmma_m64n32k16_bf16(acc, wgmma_desc(q_address + step), wgmma_desc(keys_address + step), s);
        }
        wgmma_commit();
        // meanwhile: which of this thread's 8 keys (32 wg + 8 c + 2t + e, c < 4, e < 2) hold a token
        bool used[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int j = tile * MMA_TILE + 32 * wg + 8 * (u / 2) + 2 * t + u % 2;
            const int s = j < k ? __ldg(index_row + j) : -1;
            used[u] = s >= 0 && (long long)s < n_tokens;
        }
        wgmma_wait<0>();
        fence_operands(acc);

        // score (times log2 e), -inf for unused slots; this warpgroup's row maxima over its 32 keys
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int i = 0; i < 16; ++i) {  // acc[i]: head 16 warp + g + 8 (i / 2 % 2), key 8 (i / 4) + 2t + i%2
            acc[i] = used[2 * (i / 4) + i % 2] ? acc[i] * scale_log2 : NEG_INF;
            tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], acc[i]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad hold one row
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        }
        if (t == 0) {
            row_s[wg * MMA_HEADS + 16 * warp + g] = tile_max[0];
            row_s[wg * MMA_HEADS + 16 * warp + g + 8] = tile_max[1];
        }
        __syncthreads();  // (B) both warpgroups' maxima are in row_s

        // 2. m_new = max(m_old, max over all 64 keys): the same value in both warpgroups
        float m_use[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float other = row_s[(wg ^ 1) * MMA_HEADS + 16 * warp + g + 8 * r];
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
        const unsigned values_address = kv_address + 4 * wg * WGMMA_BLOCK_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < MMA_TILE / 16; ++kk)
            wgmma_m64n256k16_bf16_nb(o, wgmma_desc(p_address + 32 * kk),
                                     wgmma_desc_n_major(values_address + 2048 * kk));
        wgmma_commit();
        wgmma_wait<0>();  // P and the tile are read before anybody passes barrier (A) again
        fence_operands(o);
    }
    cp_async_wait<0>();  // only the queries (no tile at all) or empty groups can be left in flight
    __syncthreads();     // every warpgroup is done with the last tile: kv_s is free for the row sums

    // the sums: the quad's lanes (this warpgroup's 32 keys of every tile), then the other warpgroup's
    float* sum_s = reinterpret_cast<float*>(kv_s);  // [2 warpgroups][MMA_HEADS]
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = quad_sum(row_sum[r]);
    if (t == 0) {
        sum_s[wg * MMA_HEADS + 16 * warp + g] = row_sum[0];
        sum_s[wg * MMA_HEADS + 16 * warp + g + 8] = row_sum[1];
    }
    __syncthreads();
    // out = o / sum (0 when nothing was selected); lse = ln 2 (m + log2 sum): +inf (final) or -inf (a split's
    // partial, so that it weighs nothing in the combine) when nothing was selected
    const bool whole = gridDim.z == 1;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int head = 16 * warp + g + 8 * r;
        const float total = row_sum[r] + sum_s[(wg ^ 1) * MMA_HEADS + head];  // the same in both
        const float inv_sum = total > 0.f ? 1.f / total : 0.f;
        const float row_lse = total > 0.f ? (row_max[r] + log2f(total)) * LN2 : whole ? POS_INF : NEG_INF;
        if (h0 + head < n_heads) {
            const size_t pair = (size_t)row * n_heads + h0 + head;
            if (whole) {
                __nv_bfloat16* out_row = out + pair * D_NOPE + 256 * wg + 2 * t;
#pragma unroll
                for (int c = 0; c < 32; ++c)
                    *reinterpret_cast<__nv_bfloat162*>(out_row + 8 * c) =
                        __floats2bfloat162_rn(o[4 * c + 2 * r] * inv_sum, o[4 * c + 2 * r + 1] * inv_sum);
                if (wg == 0 && t == 0) lse[pair] = row_lse;
            } else {
                const size_t slot = (size_t)split * n_rows * n_heads + pair;  // [split][row][head]
                float* o_row = o_partial + slot * D_NOPE + 256 * wg + 2 * t;
#pragma unroll
                for (int c = 0; c < 32; ++c)
                    *reinterpret_cast<float2*>(o_row + 8 * c) =
                        make_float2(o[4 * c + 2 * r] * inv_sum, o[4 * c + 2 * r + 1] * inv_sum);
                if (wg == 0 && t == 0) lse_partial[slot] = row_lse;
            }
        }
    }
#else
    __trap();  // wgmma needs sm_90a; dsa_tutorial never launches this kernel elsewhere
#endif
}

// ------------------------------------------------------------------------------------ kernel 4
//
// Kernel 3 with its stops overlapped: warp specialisation, the structure of FlashMLA's sm90 sparse FP8
// decoding kernel. Kernel 3's block runs, for every tile, wait for the gather, dequantise,
// then compute, each step while the other units idle. Here the block has three warpgroups (384 threads)
// with fixed jobs:
//   warpgroup 0, the producer: for tile t, reads the 64 selected tokens' FP8 rows straight from global
//     memory into registers (16-byte loads, no raw stage in shared memory), dequantises them and stores the
//     bf16 latents [64][576] into one of two bf16 tiles ("buffers"), in the column-blocked, 128B-swizzled
//     layout kernel 3's descriptors read; with a flag per slot (used or not) beside the buffer;
//   warpgroups 1 and 2, the consumers: kernel 3's math on the buffer of tile t (consumer c = 0, 1 in the role
//     of kernel 3's warpgroup w: S for keys 32 c .. 32 c + 31, the row maxima swapped, P in shared memory,
//     O[:, 256 c ..] += P V) while the producer fills the other buffer with tile t + 1.
// Each buffer has two mbarriers: "full" (each producer warp arrives, through its lane 0 after __syncwarp,
// when its 16 rows are stored) and "empty" (each consumer warp arrives when the wgmmas that read the buffer
// are complete): 4 and 8 arrivals a phase rather than 128 and 256 shared-memory atomics a tile. An
// mbarrier rather than a named barrier (bar.sync / bar.arrive) for this hand-over because
//   * the producer runs ahead without blocking: it arrives (non-blocking) and goes on to the other buffer,
//     and waits only when it needs a buffer back; each wait names the phase it needs (its parity), so a
//     party that is one phase behind cannot be confused with one that is on time;
//   * mbarrier.arrive releases, and try_wait acquires, at CTA scope: the producer's stores (and its
//     fence.proxy.async for the tensor cores) are ordered before the consumers' wgmma by the barrier itself.
// The consumers' two exchanges inside a tile (row maxima; the whole of P before P V) involve both consumer
// warpgroups symmetrically and nobody else, so they are named barriers (bar.sync, id 1 and 2, 256 threads):
// __syncthreads() would wait for the producer, which is a tile ahead.
//
// Registers: O is 64 heads x 256 values float32 a consumer warpgroup, 128 a thread, plus S's 16 and the
// softmax state; kernel 3 needs 206. The launch gives every thread the same count (__launch_bounds__(384, 1):
// at most 65536 / 384 = 168), then setmaxnreg moves them: the producer gives back down to
// WS_PRODUCER_REGS = 112 (its ring of 8 loads in flight, their scales, k^R and addresses), the consumers take
// WS_CONSUMER_REGS = 192: 128 x (112 + 2 x 192) = 63488, no more than the 384 x 168 the launch gave the block
// (setmaxnreg only moves registers within that: the bound is 3 x 168 = 504 a thread, not 512). ptxas
// allocates each side's code within its count, and the count decides how the producer's loads are scheduled:
// at 72 registers ptxas moved each load down to its use, so a warp kept one token's loads in flight and waited
// a memory round trip per token (984 us at B 128, h 128, s_q 2, k 2048); with room for 8 loads it keeps them
// in flight. The consumers fit 192 without spilling (184 spills); the ring does not fit 104 (it spills).
//
// Shared memory, WGMMA_SMEM_ALIGN-byte aligned inside (every tile starts 1024-byte aligned):
//   Q 72 KiB | buffer 0 72 KiB | buffer 1 72 KiB | P 8 KiB | row exchange [2][64] f32 | flags [2][64] i32 |
//   mbarriers full[2], empty[2]
// = 230432 bytes + the 1 KiB alignment slack = 231456 <= 232448 (227 KiB, the H200's opt-in a block). There is
// no raw stage (the rows pass through registers), so the two bf16 buffers fit where kernel 3 had one.
//
// The producer (4 warps, each 16 of the 64 slots of a tile): warp pw takes rows 16 pw .. 16 pw + 15, in 16
// loads of 16 bytes a lane. Load q covers a pair of tokens, v = q / 2 (rows 2v and 2v + 1 of the warp's 16),
// and half q % 2 of their 512 e4m3 bytes: lane l takes token 2v + l % 2 and its 16 bytes number
// f = (l / 2) % 4 + 4 (l / 8) + 16 (q % 2) (two 256-byte runs a load), and the float32 scale of those 16
// values. Their 16 bf16 are chunks 2f and 2f + 1 of the row. Within a quarter-warp (8 lanes, one phase of a
// 16-byte store) the lanes store to chunk positions 2 ((l / 2) % 4) + e (e = 0, then 1), four even ones for
// each token of the pair, and the two rows' swizzles differ in their lowest bit: 8 different positions, no
// bank conflict, for both stores, with no value selected between lanes; every store address is one XOR with a
// constant of a per-lane base (nope_lane, below). k^R's 128 bytes: 4 loads a tile, lanes 8u .. 8u + 7 copy
// token 4 g + u, one 16-byte chunk each. Unused slots (-1, past k, or any index outside
// [0, num_blocks * block_size)) read nothing and store zeros; their flag is 0, and the consumers give them
// the score -inf, exactly as kernel 3.
// The loads run as a ring: WS_LOADS_IN_FLIGHT = 8 loads are on their way at any time (slot q % 8); after a
// load is dequantised and stored, the load 8 further on is issued, in this tile or, for the second half of a
// tile, in the next one (whose offsets are at hand), so the loads of the next tile are in flight while this
// one is stored and while the producer waits for its buffer, and the memory never idles while the warp
// converts. Dequantisation (dequantize8) is 2.5 instructions a value: e4m3 -> f16 -> float32 -> bf16, times
// the scale as a bf16x2 multiply (exact: the scales are powers of two). The warp prefetches the rows of the
// tile after next into L2 (prefetch.global.L2, no register held: without it the kernel is 15% slower), and
// the indices of the tile after that are loaded a whole tile before they are needed (loaded just before use,
// their wait was a tenth of the producer's time).
//
// Ordering, per buffer (u = the how-many-th use of the buffer, u = tile index / 2):
//   producer: (its first loads of the tile already in flight) wait empty (parity (u & 1) ^ 1: the use before
//     was released; passes at once for u = 0), store the tile and flags, fence.proxy.async (the stores ->
//     visible to the tensor cores), arrive on full;
//   consumer: wait full (parity u & 1), issue S; wait for S, flags, max exchange (bar 1), P (the other
//     consumer's P V of the tile before, which read P, completed before it reached bar 1), fence.proxy.async,
//     bar 2, issue P V; wait for it and arrive on this tile's empty at once, then wait full for the next tile
//     and issue its S. The producer, which is the slower side, gets the buffer back the moment P V has read
//     it. (Releasing it only after the next tile's S was issued, so that the tensor cores go from P V to the
//     next S without a gap, made the producer wait for the consumers to see its own previous tile: 17% of its
//     time went to waiting on empty, and the kernel was 6% slower.)
// Q is loaded by the consumers (cp.async, then their own barrier) while the producer gathers tile 0. The
// result, split and combine are kernel 3's (the same arguments, workspace and combine kernel).

#define WS_THREADS 384                               // producer warpgroup + two consumer warpgroups
#define WS_PRODUCER_REGS 112                         // setmaxnreg: the producer's registers a thread
#define WS_CONSUMER_REGS 192                         // the consumers' (O: 128 float32 a thread)
#define WS_LOADS_IN_FLIGHT 8                         // a producer warp's loads on their way (512 bytes each)
#define WS_ROWS_PER_WARP (MMA_TILE / 4)              // 16 slots of a tile per producer warp
#define WS_ROW_BYTES (2 * MMA_HEADS * 4)             // the row-max (then row-sum) exchange [2][64] f32
#define WS_FLAG_BYTES (2 * MMA_TILE * 4)             // used flags [2 buffers][64] i32
#define WS_BARRIER_BYTES (4 * 8)                     // mbarriers full[2], empty[2]
#define WS_FULL_ARRIVALS 4                           // a buffer is full when the 4 producer warps arrived
#define WS_EMPTY_ARRIVALS 256                        // empty when the 256 consumer threads arrived
// kernel 4's carve: Q, 2 bf16 buffers, P, the row exchange, the flags, the mbarriers: 230432 bytes
#define WS_CARVE_BYTES (Q_SMEM_BYTES + 2 * KV_SMEM_BYTES + P_BYTES + WS_ROW_BYTES + WS_FLAG_BYTES + WS_BARRIER_BYTES)
// what the launch asks for: the carve plus the slack to round the base up to WGMMA_SMEM_ALIGN: 231456 bytes
#define WS_DYNAMIC_SMEM (WGMMA_SMEM_ALIGN + WS_CARVE_BYTES)
#define WS_ROW_MAX_BAR 1                             // named barriers of the consumers (0 is __syncthreads)
#define WS_P_READY_BAR 2
#define WS_CONSUMER_THREADS (WS_THREADS - 128)       // 256
static_assert(WS_DYNAMIC_SMEM <= 232448, "227 KiB: the most shared memory a block may ask for on an H100 / H200");
static_assert(P_BYTES % WGMMA_SMEM_ALIGN == 0, "P starts 1024-byte aligned, after Q and the buffers");
static_assert(WS_PRODUCER_REGS + 2 * WS_CONSUMER_REGS <= 3 * (65536 / 384 / 8 * 8),
              "setmaxnreg moves registers within the block's launch allocation: 384 threads x 168");
static_assert(WS_PRODUCER_REGS % 8 == 0 && WS_CONSUMER_REGS % 8 == 0, "setmaxnreg takes multiples of 8");
static_assert(WS_ROWS_PER_WARP == 16 && WS_LOADS_IN_FLIGHT == 8,
              "16 rows a producer warp: 16 loads of e4m3 bytes and 4 of k^R a tile, 8 in flight (ring slots q % 8)");
static_assert(D_NOPE == 32 * 16 && D_ROPE * 2 == 8 * 16, "a token: 32 lanes x 16 e4m3 bytes, 8 x 16 bytes of k^R");

extern "C" __global__ void __launch_bounds__(WS_THREADS, 1)
sparse_mla_decode_fp8_ws(const __nv_bfloat16* __restrict__ q, const unsigned char* __restrict__ kv_cache,
                         const int* __restrict__ indices, __nv_bfloat16* __restrict__ out,
                         float* __restrict__ lse, float* __restrict__ o_partial, float* __restrict__ lse_partial,
                         int n_heads, int k, int num_blocks, int block_size, long long block_stride,
                         int tiles_per_split, float softmax_scale) {
#if WGMMA_AVAILABLE
    extern __shared__ unsigned char ws_smem_raw[];
    unsigned char* q_s = align_smem(ws_smem_raw);
    unsigned char* kv_s = q_s + Q_SMEM_BYTES;                               // [2 buffers][64][576] bf16, blocked
    unsigned char* p_s = kv_s + 2 * KV_SMEM_BYTES;                          // [64 heads][64 keys] bf16, blocked
    float* row_s = reinterpret_cast<float*>(p_s + P_BYTES);                 // [2 consumers][64]
    int* used_s = reinterpret_cast<int*>(row_s + 2 * MMA_HEADS);            // [2 buffers][64]
    const unsigned full_bar = smem_address(used_s + 2 * MMA_TILE);          // full[2], then empty[2]: 8 bytes each
    const unsigned empty_bar = full_bar + 2 * 8;

    // grid: (rows x head groups, 1, splits); gridDim.z == 1: this block writes out and lse itself
    int row, h0, n_rows;
    block_row_and_heads(n_heads, row, h0, n_rows);
    const int split = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
    const int* index_row = indices + (size_t)row * k;
    const int n_tiles = (k + MMA_TILE - 1) / MMA_TILE;  // this split's tiles [first, last) of ceil(k / 64)
    const int first = split * tiles_per_split, last = min(first + tiles_per_split, n_tiles);

    if (tid == 0) {
        for (int b = 0; b < 2; ++b) {
            mbarrier_init(full_bar + 8 * b, WS_FULL_ARRIVALS);    // one arrival a producer warp
            mbarrier_init(empty_bar + 8 * b, WS_EMPTY_ARRIVALS);  // one arrival a consumer thread
        }
    }
    __syncthreads();  // the barriers are initialised before anybody uses them (the last block-wide barrier)

    if (wg == 0) {
        // ---------------------------------------------------------------- the producer
        setmaxnreg_dec<WS_PRODUCER_REGS>();
        constexpr int ROWS = WS_ROWS_PER_WARP;  // this warp's slots of a tile: row0 .. row0 + 15
        const int row0 = ROWS * warp;
        // Load q (0..15) of a tile covers the warp's token pair v = q / 2 (rows row0 + 2v, + 1), half q % 2 of
        // their e4m3 bytes: lane l takes token 2v + side (side = l % 2), 16 bytes at piece
        // f = piece + 16 (q % 2) of its 32 (piece = (l / 2) % 4 + 4 (l / 8)), and their scale, number f / 8.
        const int side = lane % 2, piece = (lane / 2) % 4 + 4 * (lane / 8);
        // Its 16 values become chunks 2f and 2f + 1 of row r = row0 + 2v + side: column block l / 8 + 4 (q % 2),
        // chunk positions pos, pos + 1 (pos = 2 ((l / 2) % 4)), swizzled by r % 8 = (2v % 8) ^ side. So a store
        // lands at buffer + nope_lane ^ K + (q % 2) 32768 + 2v 128 with nope_lane = (l / 8) 8192 + side 128 +
        // (pos ^ side) 16 (row0 128 added per warp) and K = ((2v % 8) ^ e) 16 for chunk 2f + e: one XOR with a
        // constant a store (the base has no bits where K has them). In a quarter-warp, pos ^ side takes 8
        // different values: no bank conflict, and no value needs a select.
        const unsigned nope_lane =
            (lane / 8) * WGMMA_BLOCK_BYTES + (row0 + side) * 128 + ((2 * ((lane / 2) % 4)) ^ side) * 16;
        // k^R, 4 loads a tile: load g4 covers tokens 4 g4 .. 4 g4 + 3, lanes 8u .. 8u + 7 token 4 g4 + u, chunk
        // l % 8; stored in column block 8, row r = row0 + 4 g4 + l / 8, position (l % 8) ^ (r % 8) =
        // (l % 8) ^ (l / 8) ^ (4 g4 % 8)
        const unsigned rope_lane =
            NOPE_CHUNKS / 8 * WGMMA_BLOCK_BYTES + (row0 + lane / 8) * 128 + ((lane % 8) ^ (lane / 8)) * 16;
        const unsigned kv_base = smem_address(kv_s);
        // slot row0 + lane of tile `tile` (lanes < ROWS): its index, -1 past the split, past k or for lanes
        // >= ROWS. Loaded two tiles before its offset is needed, so no wait on it.
        auto slot_index = [&](int tile) -> int {
            const int j = tile * MMA_TILE + row0 + lane;
            return tile < last && lane < ROWS && j < k ? __ldg(index_row + j) : -1;
        };
        // the byte offset of index s's token in the cache, -1 if unused (s < 0 or past the blocks: token_row)
        auto offset_of = [&](int s) -> long long {
            const unsigned char* token = token_row(kv_cache, s, num_blocks, block_size, block_stride);
            return token ? (long long)(token - kv_cache) : -1;
        };
        // L2 prefetch of this warp's rows of a tile: the 6 128-byte lines from a token's start (656 bytes
        // touch at most 6), lane l takes row l % ROWS, lines l / ROWS + (32 / ROWS) m: no registers held, the
        // loads later hit L2. No line past the token's own 656 bytes is touched.
        auto prefetch_rows = [&](long long offset) {
            const long long at = __shfl_sync(0xffffffffu, offset, lane % ROWS);
#pragma unroll
            for (int m = 0; m < (6 * ROWS + 31) / 32; ++m) {
                const int line = lane / ROWS + (32 / ROWS) * m;
                if (at >= 0 && line < 6) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(kv_cache + at + 128 * line));
            }
        };
        // The ring: WS_LOADS_IN_FLIGHT loads of e4m3 bytes (and their scales) on their way, and the k^R loads
        // issued with every 4th; a load's slot is its number q % 8, the same in every tile (16 loads a tile).
        uint4 bytes[WS_LOADS_IN_FLIGHT], rope[4];
        float scale[WS_LOADS_IN_FLIGHT];
        // issue load q of the tile whose offsets `offsets` holds (lane i < ROWS: slot row0 + i); unused slots
        // (offset -1) read nothing and give zeros
        auto issue = [&](int q, long long offsets) {
            const long long at = __shfl_sync(0xffffffffu, offsets, 2 * (q / 2) + side);
            const unsigned char* token = kv_cache + at;
            const int f = piece + 16 * (q % 2);
            bytes[q % WS_LOADS_IN_FLIGHT] = make_uint4(0, 0, 0, 0);
            scale[q % WS_LOADS_IN_FLIGHT] = 0.f;
            if (at >= 0) {
                bytes[q % WS_LOADS_IN_FLIGHT] = __ldg(reinterpret_cast<const uint4*>(token + 16 * f));
                scale[q % WS_LOADS_IN_FLIGHT] = __ldg(reinterpret_cast<const float*>(token + SCALES_AT) + f / 8);
            }
            if (q % 4 == 0) {
                const long long at_r = __shfl_sync(0xffffffffu, offsets, q + lane / 8);  // token 4 (q / 4) + l / 8
                rope[q / 4] = make_uint4(0, 0, 0, 0);
                if (at_r >= 0)
                    rope[q / 4] = __ldg(reinterpret_cast<const uint4*>(kv_cache + at_r + ROPE_AT) + lane % 8);
            }
        };
        long long cur = offset_of(slot_index(first));  // offsets of this tile's slots, then the next two tiles'
        long long nxt = offset_of(slot_index(first + 1));
        int ahead = slot_index(first + 2);  // the index of the tile after next: its offset is computed a tile later
        prefetch_rows(nxt);
#pragma unroll
        for (int q = 0; q < WS_LOADS_IN_FLIGHT; ++q) issue(q, cur);
        for (int tile = first; tile < last; ++tile) {
            const int b = (tile - first) % 2, use = (tile - first) / 2;
            // the rows of the tile after next start their way to L2; the index of the one after that is loaded
            const long long after = offset_of(ahead);
            ahead = slot_index(tile + 3);
            prefetch_rows(after);
            const unsigned buffer = kv_base + b * KV_SMEM_BYTES;
            const unsigned nope_at = buffer + nope_lane, rope_at = buffer + rope_lane;
            // this tile's first loads are on their way: now wait until its buffer is free
            mbarrier_wait(empty_bar + 8 * b, (use & 1) ^ 1);  // the consumers' last use of it is over
            if (lane < ROWS) used_s[b * MMA_TILE + row0 + lane] = cur >= 0;
#pragma unroll
            for (int q = 0; q < ROWS; ++q) {  // 16 loads a tile
                // dequantise load q (exact: dequantize8) and store its two chunks, swizzled
                const int v = q / 2, slot = q % WS_LOADS_IN_FLIGHT;
                const __nv_bfloat162 scale2 = __float2bfloat162_rn(scale[slot]);
                const uint4 lo = dequantize8(make_uint2(bytes[slot].x, bytes[slot].y), scale2);  // chunk 2f
                const uint4 hi = dequantize8(make_uint2(bytes[slot].z, bytes[slot].w), scale2);  // chunk 2f + 1
                const unsigned at = (q % 2) * 4 * WGMMA_BLOCK_BYTES + 2 * v * 128;
                st_shared_v4((nope_at ^ (((2 * v) % 8) * 16)) + at, lo);
                st_shared_v4((nope_at ^ ((((2 * v) % 8) ^ 1) * 16)) + at, hi);
                if (q % 4 == 3)  // k^R of tokens 4 (q / 4) .. + 3
                    st_shared_v4((rope_at ^ (((4 * (q / 4)) % 8) * 16)) + 4 * (q / 4) * 128, rope[q / 4]);
                // then the load 8 ahead: this tile's, or the next tile's (its slots are the same)
                if (q + WS_LOADS_IN_FLIGHT < ROWS) issue(q + WS_LOADS_IN_FLIGHT, cur);
                else issue(q + WS_LOADS_IN_FLIGHT - ROWS, nxt);  // offsets -1 past the last tile: no load
            }
            fence_proxy_async();  // this thread's stores -> visible to the tensor cores' reads
            __syncwarp();         // the warp's stores (and fences) before its lane 0 arrives
            if (lane == 0) mbarrier_arrive(full_bar + 8 * b);  // (release) the warp's 16 rows and flags are in
            cur = nxt;
            nxt = after;
        }
        return;  // nothing waits for the producer (no block-wide barrier after the split)
    }

    // -------------------------------------------------------------------- the consumers
    setmaxnreg_inc<WS_CONSUMER_REGS>();
    const int c = wg - 1, ctid = tid - 128;  // consumer c plays kernel 3's warpgroup w = c
    const int g = lane / 4, t = lane % 4;

    // the block's 64 queries [576], column-blocked; zeros for heads past n_h (while the producer gathers)
    for (int i = ctid; i < MMA_HEADS * L_CHUNKS; i += WS_CONSUMER_THREADS) {
        const int r = i / L_CHUNKS, ch = i % L_CHUNKS;
        const bool inside = h0 + r < n_heads;
        const __nv_bfloat16* src = q + ((size_t)row * n_heads + (inside ? h0 + r : 0)) * D_QK + ch * 8;
        cp_async_16(q_s + blocked(r, ch), src, inside ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();                                           // this thread's copies of Q -> tensor cores
    named_barrier_sync(WS_ROW_MAX_BAR, WS_CONSUMER_THREADS);  // all of Q is in q_s

    // this thread's output: heads 16 warp + g (o[4i], o[4i + 1]) and + 8 (o[4i + 2, 3]), values
    // 256 c + 8i + 2t, +1 (i < 32)
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};  // base-2 domain, this thread's part
    const float scale_log2 = softmax_scale * 1.4426950408889634f;     // exp(x) = 2^(x log2 e)
    const unsigned q_address = smem_address(q_s), p_address = smem_address(p_s);

    // 1. S_c = Q K^T for the 64 heads x keys 32 c .. 32 c + 31 of the tile in buffer b: 36 k-steps of 16,
    // issued and committed (one wgmma group), not waited for. The first step overwrites acc (accumulate = 0):
    // acc is not zeroed in between, as an ordinary write to it while P V is in flight would make ptxas
    // serialise the wgmmas
    float acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
    auto issue_scores = [&](int b) {
        const unsigned keys_address = smem_address(kv_s) + b * KV_SMEM_BYTES + 32 * c * 128;  // row 32 c
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < D_QK / 16; ++s) {
            const unsigned step = (s / 4) * WGMMA_BLOCK_BYTES + (s % 4) * 32;
            wgmma_m64n32k16_bf16(acc, wgmma_desc(q_address + step), wgmma_desc(keys_address + step), s);
        }
        wgmma_commit();
    };
    // The tiles: S of tile t + 1 is issued right behind P V of tile t, so the tensor cores go from one to the
    // other without waiting for this warpgroup (the groups complete in order: waiting for all but the newest
    // group is waiting for P V of the tile before).
    for (int tile = first; tile < last; ++tile) {
        const int b = (tile - first) % 2;
        const unsigned kv_address = smem_address(kv_s) + b * KV_SMEM_BYTES;
        if (tile == first) {
            mbarrier_wait(full_bar, 0);  // (acquire) the producer stored the first tile and its flags
            issue_scores(0);
        }
        // meanwhile: which of this thread's 8 keys (32 c + 8 i + 2t + e, i < 4, e < 2) hold a token
        bool used[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) used[u] = used_s[b * MMA_TILE + 32 * c + 8 * (u / 2) + 2 * t + u % 2] != 0;
        wgmma_wait<0>();  // S of this tile
        fence_operands(acc);

        // score (times log2 e), -inf for unused slots; this consumer's row maxima over its 32 keys
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int i = 0; i < 16; ++i) {  // acc[i]: head 16 warp + g + 8 (i / 2 % 2), key 8 (i / 4) + 2t + i%2
            acc[i] = used[2 * (i / 4) + i % 2] ? acc[i] * scale_log2 : NEG_INF;
            tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], acc[i]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad hold one row
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        }
        if (t == 0) {
            row_s[c * MMA_HEADS + 16 * warp + g] = tile_max[0];
            row_s[c * MMA_HEADS + 16 * warp + g + 8] = tile_max[1];
        }
        // (B) both consumers' maxima are in row_s; and both finished the P V of the tile before (each waited
        // for it before coming here), so P may be rewritten and O rescaled
        named_barrier_sync(WS_ROW_MAX_BAR, WS_CONSUMER_THREADS);

        // 2. m_new = max(m_old, max over all 64 keys): the same value in both consumers
        float m_use[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float other = row_s[(c ^ 1) * MMA_HEADS + 16 * warp + g + 8 * r];
            const float new_max = fmaxf(row_max[r], fmaxf(tile_max[r], other));
            m_use[r] = new_max == NEG_INF ? 0.f : new_max;  // nothing valid yet: p = 0, not NaN
            alpha[r] = exp2f(row_max[r] - m_use[r]);
            row_max[r] = new_max;
            row_sum[r] *= alpha[r];
        }
        // 3. p = exp(score - m_new): float32 into the sums, bf16 into P's columns 32 c .. 32 c + 31
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float p0 = exp2f(acc[4 * i] - m_use[0]), p1 = exp2f(acc[4 * i + 1] - m_use[0]);
            const float p2 = exp2f(acc[4 * i + 2] - m_use[1]), p3 = exp2f(acc[4 * i + 3] - m_use[1]);
            row_sum[0] += p0 + p1;
            row_sum[1] += p2 + p3;
            const int head = 16 * warp + g, chunk = 4 * c + i;  // keys 32 c + 8i + 2t, +1: bytes 4t, +1
            *reinterpret_cast<__nv_bfloat162*>(p_s + blocked(head, chunk) + 4 * t) = __floats2bfloat162_rn(p0, p1);
            *reinterpret_cast<__nv_bfloat162*>(p_s + blocked(head + 8, chunk) + 4 * t) =
                __floats2bfloat162_rn(p2, p3);
        }
        fence_proxy_async();  // this thread's P -> visible to the tensor cores' reads (after barrier C)
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {  // rescale, unless 1 everywhere
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                o[4 * i] *= alpha[0];
                o[4 * i + 1] *= alpha[0];
                o[4 * i + 2] *= alpha[1];
                o[4 * i + 3] *= alpha[1];
            }
        }
        // (C) the whole 64 x 64 P is in p_s; both consumers have read row_s (it may be rewritten next tile)
        named_barrier_sync(WS_P_READY_BAR, WS_CONSUMER_THREADS);

        // 4. O_c += P V[:, 256 c ..]: 4 k-steps of 16 keys; P K-major, V N-major from block 4 c
        const unsigned values_address = kv_address + 4 * c * WGMMA_BLOCK_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < MMA_TILE / 16; ++kk)
            wgmma_m64n256k16_bf16_nb(o, wgmma_desc(p_address + 32 * kk), wgmma_desc_n_major(values_address + 2048 * kk));
        wgmma_commit();
        if (tile + 1 < last) {
            // this tile's buffer goes back to the producer as soon as P V has read it (it is filling the other
            // buffer with the next tile and needs this one for the tile after): not only once the next tile is
            // here, which made the producer wait for the consumers to see its own tile first
            wgmma_wait<0>();
            fence_operands(o);
            mbarrier_arrive(empty_bar + 8 * b);  // (release) each thread after its own reads of the flags
            const int next_use = (tile + 1 - first) / 2;
            mbarrier_wait(full_bar + 8 * (b ^ 1), next_use & 1);  // (acquire) the next tile and flags are stored
            issue_scores(b ^ 1);
        }
    }
    wgmma_wait<0>();  // the last P V (its buffer is not handed back: the producer is done)
    fence_operands(o);

    // the sums: the quad's lanes (this consumer's 32 keys of every tile), then the other consumer's, through
    // row_s (both consumers read the maxima of the last tile before barrier C, so it is free)
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = quad_sum(row_sum[r]);
    if (t == 0) {
        row_s[c * MMA_HEADS + 16 * warp + g] = row_sum[0];
        row_s[c * MMA_HEADS + 16 * warp + g + 8] = row_sum[1];
    }
    named_barrier_sync(WS_ROW_MAX_BAR, WS_CONSUMER_THREADS);
    // out = o / sum (0 when nothing was selected); lse = ln 2 (m + log2 sum): +inf (final) or -inf (a split's
    // partial, so that it weighs nothing in the combine) when nothing was selected
    const bool whole = gridDim.z == 1;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int head = 16 * warp + g + 8 * r;
        const float total = row_sum[r] + row_s[(c ^ 1) * MMA_HEADS + head];  // the same in both
        const float inv_sum = total > 0.f ? 1.f / total : 0.f;
        const float row_lse = total > 0.f ? (row_max[r] + log2f(total)) * LN2 : whole ? POS_INF : NEG_INF;
        if (h0 + head < n_heads) {
            const size_t pair = (size_t)row * n_heads + h0 + head;
            if (whole) {
                __nv_bfloat16* out_row = out + pair * D_NOPE + 256 * c + 2 * t;
#pragma unroll
                for (int i = 0; i < 32; ++i)
                    *reinterpret_cast<__nv_bfloat162*>(out_row + 8 * i) =
                        __floats2bfloat162_rn(o[4 * i + 2 * r] * inv_sum, o[4 * i + 2 * r + 1] * inv_sum);
                if (c == 0 && t == 0) lse[pair] = row_lse;
            } else {
                const size_t slot = (size_t)split * n_rows * n_heads + pair;  // [split][row][head]
                float* o_row = o_partial + slot * D_NOPE + 256 * c + 2 * t;
#pragma unroll
                for (int i = 0; i < 32; ++i)
                    *reinterpret_cast<float2*>(o_row + 8 * i) =
                        make_float2(o[4 * i + 2 * r] * inv_sum, o[4 * i + 2 * r + 1] * inv_sum);
                if (c == 0 && t == 0) lse_partial[slot] = row_lse;
            }
        }
    }
#else
    __trap();  // wgmma and setmaxnreg need sm_90a; dsa_tutorial never launches this kernel elsewhere
#endif
}

// ------------------------------------------------------------------------------------ combine
//
// After a split kernel 2: for each (row, head) pair, the splits' normalised outputs o_s [512] and lse_s
// (-inf for a split that saw nothing), merged as
//   lse = ln sum_s exp(lse_s) = m + ln sum_s exp(lse_s - m),  m = max_s lse_s
//   out = sum_s exp(lse_s - lse) o_s                          (each o_s is its split's softmax average)
// and +inf, 0 when every split was empty. One warp a pair; lane l owns values 4 l + 128 c (c < 4).
extern "C" __global__ void __launch_bounds__(COMBINE_THREADS)
sparse_mla_decode_fp8_combine(const float* __restrict__ o_partial, const float* __restrict__ lse_partial,
                              __nv_bfloat16* __restrict__ out, float* __restrict__ lse, int n_pairs,
                              int n_splits) {
    const int lane = threadIdx.x % 32;
    const int pair = blockIdx.x * COMBINE_WARPS + threadIdx.x / 32;  // row * n_heads + head
    if (pair >= n_pairs) return;
    float m = NEG_INF;
    for (int s = lane; s < n_splits; s += 32) m = fmaxf(m, lse_partial[(size_t)s * n_pairs + pair]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    __nv_bfloat16* out_row = out + (size_t)pair * D_NOPE + 4 * lane;
    if (m == NEG_INF) {  // no split saw a valid slot
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            *reinterpret_cast<__nv_bfloat162*>(out_row + 128 * c) = __floats2bfloat162_rn(0.f, 0.f);
            *reinterpret_cast<__nv_bfloat162*>(out_row + 128 * c + 2) = __floats2bfloat162_rn(0.f, 0.f);
        }
        if (lane == 0) lse[pair] = POS_INF;
        return;
    }
    float sum = 0.f;
    for (int s = lane; s < n_splits; s += 32) sum += expf(lse_partial[(size_t)s * n_pairs + pair] - m);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    const float total_lse = m + logf(sum);
    float acc[4][4] = {};
    for (int s = 0; s < n_splits; ++s) {
        const float w = expf(lse_partial[(size_t)s * n_pairs + pair] - total_lse);  // 0 for an empty split
        const float* o_row = o_partial + ((size_t)s * n_pairs + pair) * D_NOPE + 4 * lane;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const float4 v = *reinterpret_cast<const float4*>(o_row + 128 * c);
            acc[c][0] += w * v.x, acc[c][1] += w * v.y, acc[c][2] += w * v.z, acc[c][3] += w * v.w;
        }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        __nv_bfloat162* pair_out = reinterpret_cast<__nv_bfloat162*>(out_row + 128 * c);
        pair_out[0] = __floats2bfloat162_rn(acc[c][0], acc[c][1]);
        pair_out[1] = __floats2bfloat162_rn(acc[c][2], acc[c][3]);
    }
    if (lane == 0) lse[pair] = total_lse;
}
