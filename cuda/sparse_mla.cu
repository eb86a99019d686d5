// Sparse MLA decode in MQA mode, equation 2:   u_t = Attn(h_t, { c_s : s in S_t })
//
// Checked against dsa_tutorial.sparse_attention.sparse_mla_attention (float32).
//
//   q        bfloat16 [B, n_h, 576]   one query token per sequence: [q_abs (512) | q_rope (64)] per head
//   kv       bfloat16 [B, S, 576]     the latent cache [c_kv (512) | k_rope (64)] (mla.LatentCache.kv)
//   indices  int32    [B, K]          the selected positions S_t; -1 (or anything outside [0, S)) = unused
//   out      float32  [B, n_h, 512]   o_latent = sum_{s in S_t} p_s c_kv[s], still in latent space
//
//   score_s,i = softmax_scale * (q_abs_i . c_kv[s] + q_rope_i . k_rope[s])
//   p_s,i     = exp(score_s,i - max) / sum_{s' in S_t} exp(score_s',i - max)
//
// A row with no valid index gets o_latent = 0 (the empty sum), never NaN.
//
//   kernel 1  sparse_mla_decode  a first correct kernel. A block serves 32 heads of one sequence.
//             It walks the K selected positions in chunks of 32: gathers the 32 latents into shared
//             memory (each 576-value latent serves all 32 heads: that is MQA mode's point), computes
//             the 32 x 32 scores (one latent per lane), then updates each head's running max, running
//             sum and 512-value output with the online softmax, and writes o / sum at the end.
//             What it leaves on the table (the book says so): float32 CUDA-core math where FlashMLA
//             uses tensor cores, and n_h / 32 blocks per sequence that each gather the same latents.
#include <cuda_bf16.h>

#define D_C 512                // kv_lora_rank: the latent c_kv
#define D_R 64                 // qk_rope_head_dim: the shared rotary key k_rope
#define D_L (D_C + D_R)        // 576 values per cached token
#define ROW (D_L + 2)          // bf16 per shared row: 289 words, an odd stride, so 32 lanes reading
                               // 32 different rows at the same column hit 32 different banks
#define HEADS 32               // heads per block
#define CHUNK 32               // selected positions per step
#define THREADS 256
#define PARTS (THREADS / HEADS)     // 8 threads share one head's 512 output values
#define PAIRS (D_C / (2 * PARTS))   // 32 pairs of output values per thread

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float2 load_bf16x2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

extern "C" __global__ void __launch_bounds__(THREADS)
sparse_mla_decode(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                  const int* __restrict__ indices, float* __restrict__ out,
                  int B, int S, int n_h, int K, float softmax_scale) {
    extern __shared__ __align__(16) unsigned char sparse_smem[];
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(sparse_smem);  // [HEADS][ROW]
    __nv_bfloat16* kv_s = q_s + HEADS * ROW;                              // [CHUNK][ROW]
    float* score_s = reinterpret_cast<float*>(kv_s + CHUNK * ROW);        // [HEADS][CHUNK]
    int* index_s = reinterpret_cast<int*>(score_s + HEADS * CHUNK);       // [CHUNK]

    const int b = blockIdx.y, h0 = blockIdx.x * HEADS;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int* index_row = indices + (size_t)b * K;

    // the block's 32 queries, zeros for heads past n_h (copied as 4-byte pairs: rows are 4-byte aligned)
    for (int i = tid; i < HEADS * (D_L / 2); i += THREADS) {
        const int hh = i / (D_L / 2), p = i % (D_L / 2);
        __nv_bfloat162 pair = __floats2bfloat162_rn(0.f, 0.f);
        if (h0 + hh < n_h)
            pair = reinterpret_cast<const __nv_bfloat162*>(q + ((size_t)b * n_h + h0 + hh) * D_L)[p];
        reinterpret_cast<__nv_bfloat162*>(q_s + hh * ROW)[p] = pair;
    }

    // this thread's share of the output: head `head`, values 2 part + 16 i and the next, i < PAIRS
    const int head = tid / PARTS, part = tid % PARTS;
    float o[PAIRS][2];
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) o[i][0] = o[i][1] = 0.f;
    float running_max = NEG_INF, running_sum = 0.f;

    for (int j0 = 0; j0 < K; j0 += CHUNK) {
        __syncthreads();  // the previous chunk is fully used (and q_s is written, the first time)
        if (tid < CHUNK) {
            const int j = j0 + tid;
            const int s = j < K ? index_row[j] : -1;
            index_s[tid] = (s >= 0 && s < S) ? s : -1;  // out-of-range entries count as unused
        }
        __syncthreads();
        // gather the selected latents c_s = [c_kv[s] | k_rope[s]], zeros for unused slots
        for (int i = tid; i < CHUNK * (D_L / 2); i += THREADS) {
            const int jj = i / (D_L / 2), p = i % (D_L / 2);
            const int s = index_s[jj];
            __nv_bfloat162 pair = __floats2bfloat162_rn(0.f, 0.f);
            if (s >= 0) pair = reinterpret_cast<const __nv_bfloat162*>(kv + ((size_t)b * S + s) * D_L)[p];
            reinterpret_cast<__nv_bfloat162*>(kv_s + jj * ROW)[p] = pair;
        }
        __syncthreads();
        // scores: warp w takes heads 4w .. 4w + 3, lane jj takes latent jj of the chunk
        {
            float dot[HEADS / 8] = {0.f, 0.f, 0.f, 0.f};
            const __nv_bfloat16* c_row = kv_s + lane * ROW;
            for (int p = 0; p < D_L; p += 2) {
                const float2 c = load_bf16x2(c_row + p);
#pragma unroll
                for (int x = 0; x < HEADS / 8; ++x) {
                    const float2 qq = load_bf16x2(q_s + (warp * (HEADS / 8) + x) * ROW + p);  // broadcast
                    dot[x] += qq.x * c.x + qq.y * c.y;
                }
            }
#pragma unroll
            for (int x = 0; x < HEADS / 8; ++x)
                // score = softmax_scale (q_abs . c_kv + q_rope . k_rope); -inf for unused slots
                score_s[(warp * (HEADS / 8) + x) * CHUNK + lane] = index_s[lane] >= 0 ? dot[x] * softmax_scale : NEG_INF;
        }
        __syncthreads();
        // online softmax for this thread's head (the 8 threads of a head do the same arithmetic)
        float chunk_max = NEG_INF;
        for (int jj = 0; jj < CHUNK; ++jj) chunk_max = fmaxf(chunk_max, score_s[head * CHUNK + jj]);
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
        for (int jj = 0; jj < CHUNK; ++jj) {
            // p_s = exp(score_s - m_new) (0 for unused slots, whose latent is zeros anyway)
            const float p = expf(score_s[head * CHUNK + jj] - new_max);
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
