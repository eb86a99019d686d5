// FP8 MQA logits over a paged key cache, for decode (DeepGEMM's fp8_paged_mqa_logits;
// dsa_tutorial.paged.paged_mqa_logits is the reference, paged_mqa_logits_cuda the launcher):
//
//   logits[b next_n + j, p] = sum_h w[b next_n + j, h] * ReLU(q[b, j, h] . k[p]) * k_scale[p]
//                             for p < len[b, j], -inf for the other p
//
//   len[b, j] = context_lens[b] - next_n + j + 1     context_lens int32 [B]
//   len[b, j] = context_lens[b, j]                   context_lens int32 [B, next_n] (DeepGEMM's per-row form)
//
//   q            e4m3 [B, next_n, H, D]   next_n in {1, 2} (draft tokens of speculative decode)
//   kv_cache     uint8 [num_blocks, 64, 1, D + 4]: block = 64 x D e4m3 values, then 64 fp32 scales
//   weights      fp32 [B * next_n, H]
//   context_lens int32 [B] or [B, next_n] (the kernels' argument lens_per_row says which)
//   block_table  int32 [B, max_blocks] (logical -> physical block)
//   schedule_meta int32 [n_ctas + 1, 2]: (batch, 256-token segment) where each block of the grid starts
//   logits       fp32 or bf16 [B * next_n, max_context_len]   (DeepGEMM's logits_dtype)
//
// A sequence's context is its longest row, context_len[b] = max_j len[b, j] (= context_lens[b] in the
// [B] form): the kernels walk its blocks, store every p < context_len[b] of its rows (a value where
// p < len[b, j], else -inf) and, with clean_logits, fill the rest of the rows with -inf. Both forms of
// context_lens are read as they are, on the device (struct Lengths): no conversion launch, no host work.
// Every kernel is compiled twice, once per storage type of the logits (template parameter T, entry
// suffix _f32 / _bf16): the same float32 logit, stored as it is or rounded to nearest-even bf16 (-inf
// stays -inf), half the bytes written.
//
// Kernels, as a progression (dsa_tutorial.paged.PAGED_MQA_LOGITS_KERNELS; each checked against
// paged.paged_mqa_logits):
// Kernel 1 (paged_mqa_logits_e4m3_h64 / _h32 for H = 64 / 32, D = 128):
//   A persistent block of 4 warps per schedule row walks its segments in order, one 64-token
//   physical block at a time. Each physical block is 8448 contiguous bytes (values then scales),
//   so it is copied whole into a shared-memory stage with 16-byte cp.async (528 copies over 128
//   threads, STAGES deep: the next blocks are in flight while this one is computed). Every cache
//   byte is read once. Warp w computes draft position j = w % next_n over the 16-key m-tiles
//   w / next_n + i * (4 / next_n): with next_n = 1 each warp takes one m-tile of the block, with
//   next_n = 2 two. The math per m-tile is that of cuda/mqa_logits.cu (kernel 2): mma.sync
//   m16n8k32 e4m3 with A = 16 keys (ldmatrix from the XOR-swizzled stage), B = q[b, j] in
//   registers (reloaded when the walk enters a new batch), ReLU, times w, head sum in registers
//   plus two shuffles, times k_scale.
//   Stores: positions p < context_len[b] only (a value, or -inf past the draft row's length).
//   With clean_logits, block s then fills [context_len[b], max_context_len) of the rows of
//   batches b = s, s + n_ctas, ... with -inf, so every position is written exactly once.
// Kernel 2 (paged_mqa_logits_f16_h64 / _h32): kernel 1 without the FP8 emulation. sm_90 has no
//   FP8 mma.sync (ptxas converts both operands to f16 inside every m16n8k32 e4m3), so this one
//   converts q[b, j] once per batch into f16 B fragments (registers) and each key fragment once
//   per warp, shared by 4 head tiles, then runs f16 mma.sync m16n8k16 (float32 accumulation, the
//   same exact products; see kernel 3 of cuda/mqa_logits.cu). f16 q takes twice the registers,
//   so a warp owns 32 heads: the block has one warp per (16-key m-tile, draft position j, 32-head
//   half) = 4 x next_n x H / 32 warps (8 for next_n = 1, H = 64: two blocks an SM; 16 for next_n =
//   2), and each physical block (64 tokens) is computed by all of them at once; both draft
//   positions read the same stage, so each key is loaded once for both. A warp writes k_scale *
//   (its head sum) per key to shared memory; after the barrier of the next step, thread
//   (j, slot) adds the halves and stores logits[b next_n + j, 64 n + slot] (coalesced). Same stages,
//   stores and -inf fill as kernel 1.
// Kernel 3 (paged_mqa_logits_warps_h64_n1 / _h64_n2 / _h32_n1 / _h32_n2): kernel 2 without its
//   per-step barriers and repeated conversions. 6 warps a block, two blocks an SM; each warp runs its
//   own cp.async pipeline over 32-key units (half a physical block: 4096 value bytes + 128 scale
//   bytes, 3 stages) of the block's segments, converts its 32 keys to f16 once and multiplies them by
//   all H heads and next_n draft positions, whose q is kept in shared memory as f16 mma fragments
//   (rewritten, between two barriers, when the walk enters a new batch). Lane (g, t) stores key 8t + g
//   of the unit: 32 consecutive floats a warp and draft position. Same -inf fill. (See its section.)
// Kernel 4 (paged_mqa_logits_wgmma_h64_n1 / ... , sm_90a only): wgmma (cuda/wgmma.cuh) on whole
//   physical blocks: 2 warpgroups a block, each with its own cp.async ring of 64-token blocks; per
//   block 4 wgmma m64nNk32 with N = next_n H (B = q[b], all draft positions and heads, in shared
//   memory). (See its section.)
// Kernel 5 (paged_mqa_logits_tma_h64_n1 / ... , sm_90a only): kernel 4's wgmma fed by TMA (a tensor map
//   over the cache's 128-byte rows for the values, cp.async.bulk for the scales): a producer warp keeps
//   one ring of physical blocks full for two consumer warpgroups, handed over through mbarriers; at
//   N <= 64 the next block's wgmma runs while this block's epilogue does. (See its section.)
//
// Bounds, for ANY values of context_lens, block_table and schedule_meta (dsa_tutorial checks them
// only with data checks on; compute-sanitizer runs every kernel on wild values,
// benchmarks/sanitize_fp8.py): a context length is clipped to [0, max_context_len] and to the
// 64 * max_blocks tokens a table row can map (context_len_of, row_len_of), a block id to [0, num_blocks)
// (cache_block), a schedule entry to a batch >= 0 and a logical block in [0, max_blocks]
// (segment_block); a block id is read only for logical blocks below the clipped context's
// ceil(context_len / 64). So a wild value gives wrong or unwritten logits for its rows, never an
// access outside q, kv_cache, weights, the tables and logits. The tokens of a last, partial block
// past context_len are computed from whatever the cache holds there but never stored (mma rows are
// independent, so a NaN there stays in its row).
#include <cuda_fp8.h>

#include "common.cuh"  // NEG_INF, smem_address, cp_async_*, ldmatrix_x4, mma_*, e4m3x4_to_f16x4,
                       // ld_shared_f2, fill_neg_inf

#define HEAD_DIM 128
#define BLOCK_KV 64                                // tokens per physical block
#define SPLIT_KV 256                               // tokens per schedule segment
#define BLOCKS_PER_SEGMENT (SPLIT_KV / BLOCK_KV)
#define WARPS 4
#define THREADS (32 * WARPS)
#define STAGES 5                                   // physical blocks in shared memory at once
#define BLOCK_BYTES (BLOCK_KV * (HEAD_DIM + 4))    // 8448
#define VALUE_BYTES (BLOCK_KV * HEAD_DIM)          // 8192: the scales start here
#define CHUNKS_PER_ROW (HEAD_DIM / 16)
#define MAX_REGISTERS 160                          // 64 for q[b, j]; 3 x 128 x 160 <= 65536: 3 blocks an SM
// Schedule rows per SM that dsa_tutorial.paged.schedule_size asks for: kernels 3 to 5 are built for
// two blocks an SM (their launch bounds), kernel 2 fits two at next_n = 1, H = 64 (8 warps of <= 128
// registers): one full wave.
#define CTAS_PER_SM 2

// The entry points: paged_mqa_logits_<variant>_h<H>[_n<NEXT_N>]_<f32 | bf16>, one per compiled H (and
// next_n for kernels 3 and 4) and storage type T of the logits, each calling KERNEL<its template
// arguments (the macro's last ones), T> with the launch bounds it was tuned with.
// lens_per_row: 0 for context_lens [B], 1 for [B, next_n].
#define PAGED_ENTRY_T(NAME, BOUNDS, T, KERNEL, ...)                                                            \
    extern "C" __global__ void BOUNDS NAME(                                                                     \
        const unsigned char* q, const unsigned char* kv_cache, const float* weights, const int* context_lens,   \
        int lens_per_row, const int* block_table, const int* schedule_meta, T* logits, int B, int next_n,      \
        int max_blocks, int num_blocks, int max_context_len, int clean_logits) {                                \
        KERNEL<__VA_ARGS__, T>(q, kv_cache, weights, context_lens, lens_per_row, block_table, schedule_meta,    \
                               logits, B, next_n, max_blocks, num_blocks, max_context_len, clean_logits);       \
    }
#define PAGED_ENTRY(NAME, BOUNDS, KERNEL, ...)                                                                 \
    PAGED_ENTRY_T(NAME##_f32, BOUNDS, float, KERNEL, __VA_ARGS__)                                              \
    PAGED_ENTRY_T(NAME##_bf16, BOUNDS, __nv_bfloat16, KERNEL, __VA_ARGS__)

// ------------------------------------------------------------------ bounds, whatever the values
// context_lens, block_table and schedule_meta are device data: dsa_tutorial checks them only with data
// checks on. These clip every value the kernels take from them, so that no access leaves its tensor.

// The longest context a launch can hold: max_context_len columns and the 64 * max_blocks tokens a row
// of block_table maps; none with an empty cache.
__device__ __forceinline__ int context_limit(int max_context_len, int max_blocks, int num_blocks) {
    return num_blocks > 0 ? (int)min((long long)max_context_len, (long long)max_blocks * BLOCK_KV) : 0;
}
// context_lens as the kernels read it, either form, and the clipping limit of its values.
struct Lengths {
    const int* context_lens;  // [B], or [B, next_n] when per_row
    int next_n, per_row, limit;
};
// Batch b's context, its longest row: context_lens[b], or max_j context_lens[b, j], clipped to
// [0, limit] (a longer context is computed as its first `limit` tokens, a negative one as empty).
__device__ __forceinline__ int context_len_of(const Lengths& lens, int b) {
    if (!lens.per_row) return min(max(lens.context_lens[b], 0), lens.limit);
    int longest = 0;
    for (int j = 0; j < lens.next_n; ++j) longest = max(longest, lens.context_lens[(size_t)b * lens.next_n + j]);
    return min(longest, lens.limit);
}
// len[b, j], the positions row (b, j) sees (p < len), given context_len = context_len_of(lens, b): in the
// [B] form context_len - next_n + j + 1 (<= 0: none), in the [B, next_n] form context_lens[b, j] clipped
// to [0, limit]. Never above context_len, so every visible position is one the walk stores.
__device__ __forceinline__ int row_len_of(const Lengths& lens, int b, int j, int context_len) {
    return lens.per_row ? min(max(lens.context_lens[(size_t)b * lens.next_n + j], 0), lens.limit)
                        : context_len - lens.next_n + j + 1;
}
// Physical block `id` of the cache, id clipped to [0, num_blocks) (num_blocks > 0 wherever a block is
// read: see context_limit): a wild id reads some block of the cache, never memory outside it.
__device__ __forceinline__ const unsigned char* cache_block(const unsigned char* kv_cache, int id, int num_blocks) {
    return kv_cache + (size_t)min(max(id, 0), num_blocks - 1) * BLOCK_BYTES;
}
// The logical block where schedule segment `segment` starts, clipped to [0, max_blocks]: no negative
// index and no int overflow from a wild schedule entry (a consistent one is unchanged, since every
// logical block a walk reaches is below max_blocks).
__device__ __forceinline__ int segment_block(int segment, int max_blocks) {
    return (int)min((long long)max(segment, 0) * BLOCKS_PER_SEGMENT, (long long)max_blocks);
}

// 16 bytes global -> shared, asynchronously, always all 16 read (no src-size operand): the whole block
// is inside the cache. (cuda/common.cuh has the form with src-size, which zero-fills.)
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(dst)), "l"(src));
}

// Where the walk is: batch b, logical block n of that batch. Every thread walks identically.
struct Cursor {
    int b, n;
};

__device__ __forceinline__ int blocks_of(const Lengths& lens, int b) {
    return (context_len_of(lens, b) + BLOCK_KV - 1) / BLOCK_KV;
}
// Skip past finished (and empty) batches: afterwards c.b >= B, or c.n < blocks_of(c.b) <= max_blocks.
__device__ __forceinline__ void settle(Cursor& c, const Lengths& lens, int B) {
    while (c.b < B && c.n >= blocks_of(lens, c.b)) { ++c.b; c.n = 0; }
}
// Still inside this block's share: before (end_b, logical block end_n), and inside the batch.
__device__ __forceinline__ bool inside(const Cursor& c, int end_b, int end_n, int B) {
    return c.b < B && (c.b < end_b || (c.b == end_b && c.n < end_n));
}
// This block's share of the walk, from its two rows of schedule_meta: it starts at `start` (settled on
// a block to compute) and stops before (end_b, end_n), in (batch, logical block) terms.
__device__ __forceinline__ void schedule_bounds(const int* schedule_meta, const Lengths& lens, int B, int max_blocks,
                                                Cursor& start, int& end_b, int& end_n) {
    start = {max(schedule_meta[2 * blockIdx.x], 0), segment_block(schedule_meta[2 * blockIdx.x + 1], max_blocks)};
    end_b = schedule_meta[2 * blockIdx.x + 2];
    end_n = segment_block(schedule_meta[2 * blockIdx.x + 3], max_blocks);
    settle(start, lens, B);
}

// clean_logits: -inf past each (clipped) context, [context_len, max_context_len) of rows b next_n + j,
// for the batches b = blockIdx.x, blockIdx.x + gridDim.x, ... (so every position is written exactly
// once); warp r % n_warps of the block takes row r.
template <typename T>
__device__ __forceinline__ void fill_past_contexts(T* logits, const Lengths& lens, int B, int max_context_len,
                                                   int n_warps) {
    const int next_n = lens.next_n;
    for (int r = threadIdx.x / 32; ; r += n_warps) {
        const int b = blockIdx.x + (r / next_n) * gridDim.x;
        if (b >= B) break;
        fill_neg_inf(logits + (size_t)(b * next_n + r % next_n) * max_context_len, context_len_of(lens, b),
                     max_context_len, threadIdx.x % 32);
    }
}

// Copy physical block block_table[b, n] (8448 bytes) into a stage with the block's n_threads threads
// (kernels 1 and 2): values swizzled, scales as they are.
__device__ __forceinline__ void load_block(unsigned char* stage, const unsigned char* kv_cache, const int* block_table,
                                           int max_blocks, int num_blocks, const Cursor& c, int n_threads) {
    const unsigned char* src = cache_block(kv_cache, block_table[(size_t)c.b * max_blocks + c.n], num_blocks);
    for (int chunk = threadIdx.x; chunk < BLOCK_BYTES / 16; chunk += n_threads) {
        const int offset = chunk * 16;
        const int dst = offset < VALUE_BYTES ? swizzled(chunk / CHUNKS_PER_ROW, chunk % CHUNKS_PER_ROW) : offset;
        cp_async_16(stage + dst, src + offset);
    }
}

// The next load of kernels 1 and 2: while the load cursor is inside this block's share, copy its
// physical block into `stage` and move the cursor on (the caller commits one group a step, empty or not).
__device__ __forceinline__ void load_next(unsigned char* stage, Cursor& load, int end_b, int end_n,
                                          const unsigned char* kv_cache, const int* block_table,
                                          const Lengths& lens, int B, int max_blocks, int num_blocks, int n_threads) {
    if (!inside(load, end_b, end_n, B)) return;
    load_block(stage, kv_cache, block_table, max_blocks, num_blocks, load, n_threads);
    ++load.n;
    settle(load, lens, B);
}

// ------------------------------------------------------------------------------------ kernel 1

template <int H, typename T>
__device__ void paged_mqa_logits_e4m3(const unsigned char* __restrict__ q, const unsigned char* __restrict__ kv_cache,
                                      const float* __restrict__ weights, const int* __restrict__ context_lens,
                                      int lens_per_row, const int* __restrict__ block_table,
                                      const int* __restrict__ schedule_meta, T* __restrict__ logits,
                                      int B, int next_n, int max_blocks, int num_blocks,
                                      int max_context_len, int clean_logits) {
    constexpr int N_TILES = H / 8;
    __shared__ __align__(128) unsigned char stages[STAGES][BLOCK_BYTES];
    __shared__ __align__(16) float w_rows[WARPS][H];

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int j = warp % next_n;                      // this warp's draft position
    const int first_mt = warp / next_n, mt_step = WARPS / next_n;

    const Lengths lens = {context_lens, next_n, lens_per_row, context_limit(max_context_len, max_blocks, num_blocks)};
    Cursor load;
    int end_b, end_n;
    schedule_bounds(schedule_meta, lens, B, max_blocks, load, end_b, end_n);
    Cursor work = load;

    // pipeline prologue: the first STAGES - 1 blocks in flight
    for (int s = 0; s < STAGES - 1; ++s) {
        load_next(stages[s], load, end_b, end_n, kv_cache, block_table, lens, B, max_blocks, num_blocks, THREADS);
        cp_async_commit();
    }

    unsigned q_frag[N_TILES][4][2];  // B fragments of q[b, j] (see mqa_logits.cu)
    const float2* w_pairs = reinterpret_cast<const float2*>(w_rows[warp]);
    int q_batch = -1;  // the batch whose q sits in q_frag

    for (int step = 0; inside(work, end_b, end_n, B); ++step) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // block `step` has landed, and every warp is done with block step - 1
        load_next(stages[(step + STAGES - 1) % STAGES], load, end_b, end_n, kv_cache, block_table, lens, B,
                  max_blocks, num_blocks, THREADS);
        cp_async_commit();

        const int b = work.b, row = b * next_n + j;
        if (b != q_batch) {  // a new batch: its q[b, j] and w[b next_n + j] (warp-uniform branch)
            #pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt) {
                const unsigned char* q_head = q + ((size_t)row * H + nt * 8 + g) * HEAD_DIM;
                #pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    q_frag[nt][kk][0] = *reinterpret_cast<const unsigned*>(q_head + kk * 32 + 4 * t);
                    q_frag[nt][kk][1] = *reinterpret_cast<const unsigned*>(q_head + kk * 32 + 16 + 4 * t);
                }
            }
            __syncwarp();  // every lane is done reading the previous batch's weights
            for (int h = lane; h < H; h += 32) w_rows[warp][h] = weights[(size_t)row * H + h];
            __syncwarp();
            q_batch = b;
        }

        const unsigned char* stage = stages[step % STAGES];
        const float* k_scale = reinterpret_cast<const float*>(stage + VALUE_BYTES);
        const int context_len = context_len_of(lens, b);
        const int row_len = row_len_of(lens, b, j, context_len);  // draft j sees p < row_len
        T* logits_row = logits + (size_t)row * max_context_len;
        #pragma unroll 1
        for (int mt = first_mt; mt < BLOCK_KV / 16; mt += mt_step) {
            const int p0 = work.n * BLOCK_KV + mt * 16;  // position of the m-tile's first key
            if (p0 >= context_len) break;                // past the context: nothing to store
            const int p_lo = p0 + g, p_hi = p0 + g + 8;
            float sum_lo = 0.f, sum_hi = 0.f;
            if (p0 < row_len) {  // some key visible to draft j (warp-uniform)
                #pragma unroll
                for (int hg = 0; hg < N_TILES / 4; ++hg) {
                    // scores[p, h] = k[p] . q[b, j, h] for 16 keys x 32 heads
                    float acc[4][4];
                    e4m3_key_scores(acc, stage, mt, q_frag, hg, lane);
                    // sum_h w[row, h] * ReLU(scores[p, h]) over this lane's 2 heads of each n-tile
                    #pragma unroll
                    for (int n = 0; n < 4; ++n)
                        add_weighted_relu(acc[n][0], acc[n][1], acc[n][2], acc[n][3],
                                          ld_shared_f2(w_pairs + (4 * hg + n) * 4 + t), sum_lo, sum_hi);
                }
                // ... and over the 4 lanes of a key row
                sum_lo = quad_sum(sum_lo);
                sum_hi = quad_sum(sum_hi);
            }
            // logits[row, p] = k_scale[p] * sum for visible p, -inf for context positions j cannot see
            if (t < 2) {
                const int p = t == 0 ? p_lo : p_hi;
                const float sum = t == 0 ? sum_lo : sum_hi;
                if (p < context_len) logits_row[p] = from_float<T>(p < row_len ? sum * k_scale[p % BLOCK_KV] : NEG_INF);
            }
        }
        ++work.n;
        settle(work, lens, B);
    }
    cp_async_wait<0>();

    if (clean_logits) fill_past_contexts(logits, lens, B, max_context_len, WARPS);
}

PAGED_ENTRY(paged_mqa_logits_e4m3_h64, __maxnreg__(MAX_REGISTERS), paged_mqa_logits_e4m3, 64)
PAGED_ENTRY(paged_mqa_logits_e4m3_h32, __maxnreg__(MAX_REGISTERS), paged_mqa_logits_e4m3, 32)

// ------------------------------------------------------------------------------------ kernel 2

// The conversion that sm_90 would otherwise redo inside every emulated e4m3 mma (see kernel 3 of
// cuda/mqa_logits.cu): q once, to f16 B fragments in registers; each key fragment once per
// warp, shared by the warp's 4 head tiles. The k-order rule is that of that file; the helpers
// (e4m3x4_to_f16x4, mma_f16_16816) are in cuda/common.cuh.

#define K2_HEADS_PER_WARP 32
#define K2_MTILES (BLOCK_KV / 16)  // 16-key m-tiles of a physical block: one warp each, per (draft position, half)
#define K2_MAX_THREADS 512         // K2_MTILES x next_n x H / 32 warps: at most 4 x 2 x 2 = 16

template <int H, typename T>
__device__ void paged_mqa_logits_f16(const unsigned char* __restrict__ q, const unsigned char* __restrict__ kv_cache,
                                     const float* __restrict__ weights, const int* __restrict__ context_lens,
                                     int lens_per_row, const int* __restrict__ block_table,
                                     const int* __restrict__ schedule_meta, T* __restrict__ logits,
                                     int B, int next_n, int max_blocks, int num_blocks,
                                     int max_context_len, int clean_logits) {
    constexpr int HALVES = H / K2_HEADS_PER_WARP;   // warps a draft position: 2 for H = 64, 1 for H = 32
    constexpr int N_TILES = K2_HEADS_PER_WARP / 8;  // 4
    constexpr int K_STEPS = HEAD_DIM / 16;          // 8
    constexpr int MAX_PARTS = 2 * HALVES;           // (draft position, head half) pairs at next_n = 2
    __shared__ __align__(128) unsigned char stages[STAGES][BLOCK_BYTES];
    __shared__ __align__(16) float w_rows[K2_MAX_THREADS / 32][K2_HEADS_PER_WARP];
    // partials[step % 2][part][slot]: k_scale * sum over a part's 32 heads, summed over the head halves
    // one step later, after the barrier that starts the next step
    __shared__ float partials[2][MAX_PARTS][BLOCK_KV];

    const int n_threads = blockDim.x;                  // 32 K2_MTILES next_n HALVES: one warp per (m-tile, part)
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int parts = next_n * HALVES;
    const int part = warp % parts, mt = warp / parts;  // this warp: 16 keys mt of each block, for one part
    const int j = part / HALVES, half = part % HALVES;

    const Lengths lens = {context_lens, next_n, lens_per_row, context_limit(max_context_len, max_blocks, num_blocks)};
    Cursor load;
    int end_b, end_n;
    schedule_bounds(schedule_meta, lens, B, max_blocks, load, end_b, end_n);
    Cursor work = load;

    for (int s = 0; s < STAGES - 1; ++s) {
        load_next(stages[s], load, end_b, end_n, kv_cache, block_table, lens, B, max_blocks, num_blocks, n_threads);
        cp_async_commit();
    }

    unsigned q_frag[N_TILES][K_STEPS][2];  // f16 B fragments of q[b, j], heads 32 half .. 32 half + 31
    const float2* w_pairs = reinterpret_cast<const float2*>(w_rows[warp]);
    int q_batch = -1;

    // logits of the block computed at step `done` (cursor `c`): one (draft position, slot) a thread
    auto store_block = [&](const Cursor& c, int done) {
        if (threadIdx.x >= next_n * BLOCK_KV) return;
        const int jj = threadIdx.x / BLOCK_KV, slot = threadIdx.x % BLOCK_KV;
        const int context_len = context_len_of(lens, c.b), p = c.n * BLOCK_KV + slot;
        if (p >= context_len) return;  // past the context: nothing stored (clean_logits fills it below)
        // logits[b next_n + jj, p] = sum over the head halves of k_scale[p] * sum_h w ReLU(q . k), or -inf
        float logit = NEG_INF;         // positions draft jj cannot see
        if (p < row_len_of(lens, c.b, jj, context_len)) {  // visible: its m-tile was computed, its partials written
            logit = 0.f;
            #pragma unroll
            for (int h = 0; h < HALVES; ++h) logit += partials[done % 2][jj * HALVES + h][slot];
        }
        logits[(size_t)(c.b * next_n + jj) * max_context_len + p] = from_float<T>(logit);
    };

    Cursor done = work;
    int step = 0;
    for (; inside(work, end_b, end_n, B); ++step) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // block `step` has landed; every warp is done with step - 1 and its partials
        load_next(stages[(step + STAGES - 1) % STAGES], load, end_b, end_n, kv_cache, block_table, lens, B,
                  max_blocks, num_blocks, n_threads);
        cp_async_commit();
        if (step > 0) store_block(done, step - 1);

        const int b = work.b, row = b * next_n + j;
        if (b != q_batch) {  // a new batch: q[b, j] to f16 fragments, w[row] of this half (warp-uniform)
            #pragma unroll
            for (int n = 0; n < N_TILES; ++n) {
                const unsigned char* q_head = q + ((size_t)row * H + half * K2_HEADS_PER_WARP + n * 8 + g) * HEAD_DIM;
                #pragma unroll
                for (int s = 0; s < K_STEPS; ++s)
                    e4m3x4_to_f16x4(*reinterpret_cast<const unsigned*>(q_head + s * 16 + 4 * t), q_frag[n][s][0],
                                    q_frag[n][s][1]);
            }
            __syncwarp();  // every lane is done reading the previous batch's weights
            w_rows[warp][lane] = weights[(size_t)row * H + half * K2_HEADS_PER_WARP + lane];
            __syncwarp();
            q_batch = b;
        }

        const unsigned char* stage = stages[step % STAGES];
        const float* k_scale = reinterpret_cast<const float*>(stage + VALUE_BYTES);
        const int context_len = context_len_of(lens, b);
        const int p0 = work.n * BLOCK_KV + mt * 16;  // position of the m-tile's first key
        // some key of the m-tile visible to draft j (warp-uniform); else store_block writes -inf / nothing
        if (p0 < row_len_of(lens, b, j, context_len)) {
            // scores[p, h] = k[p] . q[b, j, h] for 16 keys x this warp's 32 heads, float32 accumulators
            float acc[N_TILES][4];
            f16_key_scores(acc, stage, mt, q_frag, lane);
            // sum_h w[row, h] * ReLU(scores[p, h]) over this lane's 2 heads of each n-tile ...
            float sum_lo = 0.f, sum_hi = 0.f;  // keys g and g + 8
            #pragma unroll
            for (int n = 0; n < N_TILES; ++n)  // w[row, 32 half + 8n + 2t], and + 1
                add_weighted_relu(acc[n][0], acc[n][1], acc[n][2], acc[n][3], ld_shared_f2(w_pairs + n * 4 + t),
                                  sum_lo, sum_hi);
            // ... over the 4 lanes of a key row ...
            sum_lo = quad_sum(sum_lo);
            sum_hi = quad_sum(sum_hi);
            // ... times k_scale[p]; lane t = 0 keeps key g, lane t = 1 key g + 8
            if (t < 2) {
                const int slot = mt * 16 + g + 8 * t;
                partials[step % 2][part][slot] = (t == 0 ? sum_lo : sum_hi) * k_scale[slot];
            }
        }
        done = work;
        ++work.n;
        settle(work, lens, B);
    }
    __syncthreads();  // the last block's partials are complete
    if (step > 0) store_block(done, step - 1);
    cp_async_wait<0>();

    if (clean_logits) fill_past_contexts(logits, lens, B, max_context_len, n_threads / 32);
}

PAGED_ENTRY(paged_mqa_logits_f16_h64, __launch_bounds__(K2_MAX_THREADS), paged_mqa_logits_f16, 64)
PAGED_ENTRY(paged_mqa_logits_f16_h32, __launch_bounds__(K2_MAX_THREADS), paged_mqa_logits_f16, 32)

// ------------------------------------------------------------------------------------ kernel 3

// What holds kernel 2 back (reasoned from the code; H200, B = 128, context 32768, next_n = 1, 378 us):
// every block of the grid does 248 steps of 64 tokens, 1.5 us (about 3000 cycles) each, and every
// step ends in a block-wide barrier. Between two barriers a warp does only 32 mma (one 16-key m-tile
// x 32 heads: 4 chains of 8 dependent mma, about 300 cycles of latency), its epilogue, and (warps 0
// and 1) the previous step's stores, while the tensor cores of the SM idle in every barrier, block-
// table / context_lens load and epilogue of both resident blocks. Memory is not the limit: 4 blocks
// (34 KB) a block of the grid stay in flight, 68 KB an SM, more than the ~40 KB that 4.27 TB/s
// needs. Each key is also converted e4m3 -> f16 by every warp that reads it (2 at next_n = 1, 4 at
// next_n = 2): one cvt per mma. At next_n = 2 (16 warps, 1 block an SM) nothing overlaps the barriers.
// Kernel 3 (paged_mqa_logits_warps_h64_n1 / _h64_n2 / _h32_n1 / _h32_n2: H and next_n compiled in):
// * no barrier in the main loop: each of the 6 warps owns a private cp.async ring (K3_STAGES units
//   of 32 keys = 4224 bytes: 4096 value bytes, swizzled, then the 32 scales; 2 units in flight) and
//   walks its own units (unit u = warp + 6 i of the run), so warps drift and hide each other's
//   latencies; two blocks an SM (<= 170 registers: 12 warps, 24 units = 101 KB in flight);
// * a warp converts its 32 keys once (2 m-tiles, A as f16 in 64 registers) and multiplies them by
//   every head and draft position: q[b] sits in shared memory as f16 B fragments in lane order (one
//   conflict-free 16-byte ld.shared per lane gives 2 k-steps of one n-tile, used by both m-tiles), so
//   each key byte is converted exactly once: 0.5 cvt per mma at next_n = 1, 0.25 at next_n = 2;
// * per warp and unit: 128 x next_n mma between two __syncwarp, 4 accumulator chains in flight;
// * the head sum stays in registers (ReLU, times w from shared memory), the 4 lanes of a key row
//   meet in 3 shuffles (a transposing reduction), and lane (g, t) stores key 8t + g: a warp writes
//   32 consecutive floats (one 128-byte line) per draft position;
// * block ids: lane k fetches the id of the warp's unit i0 + k once per 32 units (a shuffle then).
// Block-wide barriers remain only where the walk enters a new batch (q and w of that batch are
// rewritten); the first 2 units of the new run are already in flight by then.
// Same k-order rule as kernel 2 (bytes 16c + 4t .. + 3 of a key: k-step c, pairs lo / hi).

#define K3_WARPS 6
#define K3_THREADS (32 * K3_WARPS)
#define K3_UNIT_KEYS 32                                   // keys a warp computes at once: 2 m-tiles
#define K3_UNIT_VALUES (K3_UNIT_KEYS * HEAD_DIM)          // 4096
#define K3_UNIT_BYTES (K3_UNIT_KEYS * (HEAD_DIM + 4))     // 4224: values, then the 32 scales
#define K3_STAGES 3                                       // units of a warp in shared memory at once
#define K3_NT_UNROLL 2                                    // n-tiles unrolled (more: spills at 170 registers)
#define K3_IDS 32                                         // block ids a warp fetches at once (one a lane)
// Dynamic shared memory for N = next_n H rows of q: N * K3_SMEM_PER_ROW + K3_SMEM_STAGES bytes
#define K3_SMEM_PER_ROW (2 * HEAD_DIM + 4)                // q of one (j, h) as f16 fragments, and its weight
#define K3_SMEM_STAGES (K3_WARPS * K3_STAGES * K3_UNIT_BYTES)  // every warp's ring

// 16 / 8 bytes from shared memory. .volatile: re-read at every unit, never hoisted out of the unit loop
// (ptxas would keep q fragments and head weights in registers across units, and spill).
__device__ __forceinline__ uint4 ld_shared_u4(unsigned address) {
    uint4 v;
    asm volatile("ld.volatile.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address));
    return v;
}
__device__ __forceinline__ float2 ld_shared_f2_at(unsigned address) {
    float2 v;
    asm volatile("ld.volatile.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(address));
    return v;
}

// Copy unit `half` (keys 32 half .. 32 half + 31) of the physical block at `block` into the stage at
// shared address `stage`: values swizzled (row = key), then the unit's 32 scales. The whole warp
// issues it. Lane l copies chunk l + 32 i = row l / 8 + 4 i, column l % 8, so its destination is
// stage + 512 i + one of two lane offsets (row % 8 = l / 8 + 4 (i % 2)): `dst_even`, `dst_even ^ 64`.
__device__ __forceinline__ void k3_load_unit(unsigned stage, const unsigned char* block, int half, int lane) {
    const unsigned char* values = block + half * K3_UNIT_VALUES + lane * 16;
    const unsigned dst_even = (lane / 8) * HEAD_DIM + (((lane % 8) ^ (lane / 8)) * 16);
    #pragma unroll
    for (int i = 0; i < K3_UNIT_VALUES / 16 / 32; ++i)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                     ::"r"(stage + 512 * i + (i % 2 ? dst_even ^ 64 : dst_even)), "l"(values + 512 * i));
    if (lane < K3_UNIT_KEYS * 4 / 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                     ::"r"(stage + K3_UNIT_VALUES + lane * 16), "l"(block + VALUE_BYTES + half * 128 + lane * 16));
}

// ldmatrix_x4 of common.cuh, from a 32-bit shared address.
__device__ __forceinline__ void ldmatrix_x4_at(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// Entry k of this block's schedule rows: (batch, segment) of its start (k = 0, 1) and end (k = 2, 3).
__device__ __forceinline__ int schedule_entry(const int* schedule_meta, int k) {
    int v;
    asm volatile("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(schedule_meta + 2 * blockIdx.x + k));
    return v;
}
// The first batch of this block's runs (>= 0 whatever the schedule holds).
__device__ __forceinline__ int first_run(const int* schedule_meta) { return max(schedule_entry(schedule_meta, 0), 0); }

// Run b of this block's schedule rows (kernels 3 and 4): false once b is past the block's share;
// else the context length of batch b and the logical blocks [n_begin, n_end) of it that this block
// computes (empty for an empty context), with 0 <= n_begin and n_end <= ceil(context_len / 64) <=
// max_blocks whatever the schedule and context_lens hold. The row's bounds are re-read at each run
// (schedule_entry: L1 hits), not kept in registers through the unit loop.
__device__ __forceinline__ bool schedule_run(const int* schedule_meta, const Lengths& lens, int B, int b,
                                             int max_blocks, int& context_len, int& n_begin, int& n_end) {
    const int start_b = first_run(schedule_meta), start_seg = schedule_entry(schedule_meta, 1);
    const int end_b = schedule_entry(schedule_meta, 2), end_seg = schedule_entry(schedule_meta, 3);
    if (!(b < B && (b < end_b || (b == end_b && end_seg > 0)))) return false;
    context_len = context_len_of(lens, b);
    const int n_blocks = (context_len + BLOCK_KV - 1) / BLOCK_KV;
    n_begin = b == start_b ? segment_block(start_seg, max_blocks) : 0;
    n_end = b == end_b ? min(segment_block(end_seg, max_blocks), n_blocks) : n_blocks;
    return true;
}

// Dynamic shared memory: q fragments [NEXT_N][H / 8][4][32] uint4, w [NEXT_N][H] float, then the
// stages of the K3_WARPS warps (K3_STAGES x 4224 bytes each): NEXT_N H K3_SMEM_PER_ROW + K3_SMEM_STAGES
// bytes, the size dsa_tutorial.paged launches it with.
template <int H, int NEXT_N, typename T>
__device__ void paged_mqa_logits_warps(const unsigned char* __restrict__ q, const unsigned char* __restrict__ kv_cache,
                                       const float* __restrict__ weights, const int* __restrict__ context_lens,
                                       int lens_per_row, const int* __restrict__ block_table,
                                       const int* __restrict__ schedule_meta, T* __restrict__ logits,
                                       int B, int /* next_n = NEXT_N */, int max_blocks,
                                       int num_blocks, int max_context_len, int clean_logits) {
    constexpr int NT = H / 8;                         // n-tiles of 8 heads
    constexpr int Q_FRAGS = NEXT_N * NT * 4 * 32;     // uint4 entries
    static_assert(Q_FRAGS * 16 + NEXT_N * H * 4 == NEXT_N * H * K3_SMEM_PER_ROW, "K3_SMEM_PER_ROW is the q + w carve");
    const Lengths lens = {context_lens, NEXT_N, lens_per_row, context_limit(max_context_len, max_blocks, num_blocks)};
    extern __shared__ __align__(128) unsigned char k3_smem[];
    uint4* q_frags = reinterpret_cast<uint4*>(k3_smem);
    float* w_s = reinterpret_cast<float*>(k3_smem + Q_FRAGS * 16);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const unsigned stages = smem_address(k3_smem + Q_FRAGS * 16 + NEXT_N * H * 4 + warp * (K3_STAGES * K3_UNIT_BYTES));
    const unsigned q_lane = smem_address(q_frags + lane);  // + ((j NT + nt) 4 + p) 512: entry (j, nt, p) of this lane
    const unsigned w_lane = smem_address(w_s + 2 * t);     // + (j H + 8 nt) 4: w[row j, 8 nt + 2t], and + 1

    // runs: the blocks of one batch inside this schedule row (schedule_run)
    for (int b = first_run(schedule_meta); ; ++b) {
        int context_len, n_begin, n_end;
        if (!schedule_run(schedule_meta, lens, B, b, max_blocks, context_len, n_begin, n_end)) break;
        if (n_begin >= n_end) continue;  // an empty context (block-uniform)
        const int first = n_begin * BLOCK_KV;  // position of the run's first key
        const int n_units = (min(context_len, n_end * BLOCK_KV) - first + K3_UNIT_KEYS - 1) / K3_UNIT_KEYS;
        const int my_units = warp < n_units ? (n_units - warp + K3_WARPS - 1) / K3_WARPS : 0;

        // unit i of this warp is run unit u = warp + K3_WARPS i: logical block n_begin + u / 2, half u % 2.
        // Lane k holds the physical block of unit i0 + k (i0 a multiple of K3_IDS).
        int ids = 0;
        auto issue = [&](int i) {
            if (i % K3_IDS == 0) {
                const int u = warp + K3_WARPS * (i + lane);
                ids = u < n_units ? block_table[(size_t)b * max_blocks + first / BLOCK_KV + u / 2] : 0;
            }
            const int physical = __shfl_sync(0xffffffffu, ids, i % K3_IDS);
            k3_load_unit(stages + (i % K3_STAGES) * K3_UNIT_BYTES, cache_block(kv_cache, physical, num_blocks),
                         (warp + K3_WARPS * i) % 2, lane);
        };

        __syncthreads();  // every warp is done with the previous run (its q, w and stages)
        #pragma unroll
        for (int s = 0; s < K3_STAGES - 1; ++s) {  // prologue: in flight while q is converted
            if (s < my_units) issue(s);
            cp_async_commit();
        }
        // q[b, j] -> f16 B fragments: entry (j, nt, p, lane) = head 8 nt + g, bytes 32p + 4t .. + 3 (k-step
        // 2p: b0, b1) and 32p + 16 + 4t .. + 3 (k-step 2p + 1)
        for (int e = threadIdx.x; e < Q_FRAGS; e += K3_THREADS) {
            const int l = e % 32, p = (e / 32) % 4, nt = (e / 128) % NT, j = e / (128 * NT);
            const unsigned char* src =
                q + ((size_t)(b * NEXT_N + j) * H + nt * 8 + l / 4) * HEAD_DIM + 32 * p + 4 * (l % 4);
            uint4 f;
            e4m3x4_to_f16x4(*reinterpret_cast<const unsigned*>(src), f.x, f.y);
            e4m3x4_to_f16x4(*reinterpret_cast<const unsigned*>(src + 16), f.z, f.w);
            q_frags[e] = f;
        }
        for (int e = threadIdx.x; e < NEXT_N * H; e += K3_THREADS) w_s[e] = weights[(size_t)b * NEXT_N * H + e];
        __syncthreads();

        #pragma unroll 1
        for (int i = 0; i < my_units; ++i) {
            cp_async_wait<K3_STAGES - 2>();
            __syncwarp();  // unit i has landed for every lane; every lane is done with unit i - 1
            if (i + K3_STAGES - 1 < my_units) issue(i + K3_STAGES - 1);
            cp_async_commit();

            const unsigned stage = stages + (i % K3_STAGES) * K3_UNIT_BYTES;

            // A fragments of the 32 keys, f16: a[m][c] = m-tile m (keys 16m ..), k-step c (bytes 16c ..)
            unsigned a[2][8][4];
            #pragma unroll
            for (int m = 0; m < 2; ++m) {
                #pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    unsigned k_bytes[4];
                    ldmatrix_x4_at(k_bytes, stage + swizzled(16 * m + lane % 16, 2 * kk + lane / 16));
                    #pragma unroll
                    for (int s = 0; s < 2; ++s) {
                        e4m3x4_to_f16x4(k_bytes[2 * s], a[m][2 * kk + s][0], a[m][2 * kk + s][2]);      // key g
                        e4m3x4_to_f16x4(k_bytes[2 * s + 1], a[m][2 * kk + s][1], a[m][2 * kk + s][3]);  // key g + 8
                    }
                }
            }

            #pragma unroll
            for (int j = 0; j < NEXT_N; ++j) {
                float sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // [m-tile][key g, g + 8]: sum_h w ReLU(score)
                #pragma unroll K3_NT_UNROLL
                for (int nt = 0; nt < NT; ++nt) {
                    float acc[2][4];  // [m-tile]: 2 chains of 8 mma; unrolled, consecutive n-tiles overlap
                    #pragma unroll
                    for (int m = 0; m < 2; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
                    #pragma unroll
                    for (int p = 0; p < 4; ++p) {
                        const uint4 bq = ld_shared_u4(q_lane + ((j * NT + nt) * 4 + p) * 512);
                        #pragma unroll
                        for (int m = 0; m < 2; ++m) {
                            mma_f16_16816(acc[m], a[m][2 * p], bq.x, bq.y);
                            mma_f16_16816(acc[m], a[m][2 * p + 1], bq.z, bq.w);
                        }
                    }
                    const float2 w_h = ld_shared_f2_at(w_lane + (j * H + 8 * nt) * 4);
                    #pragma unroll
                    for (int m = 0; m < 2; ++m)
                        add_weighted_relu(acc[m][0], acc[m][1], acc[m][2], acc[m][3], w_h, sum[m][0], sum[m][1]);
                }
                // over the 4 lanes of a key row, transposed: lane t ends with the total of key 8t + g,
                // i.e. value k = t of (sum[0][0], sum[0][1], sum[1][0], sum[1][1]) (key 16m + 8r + g)
                const bool hi2 = t & 2, hi1 = t & 1;
                float keep0 = hi2 ? sum[1][0] : sum[0][0], keep1 = hi2 ? sum[1][1] : sum[0][1];
                const float give0 = hi2 ? sum[0][0] : sum[1][0], give1 = hi2 ? sum[0][1] : sum[1][1];
                keep0 += __shfl_xor_sync(0xffffffffu, give0, 2);
                keep1 += __shfl_xor_sync(0xffffffffu, give1, 2);
                float total = hi1 ? keep1 : keep0;
                total += __shfl_xor_sync(0xffffffffu, hi1 ? keep0 : keep1, 1);
                float scale;  // k_scale of key 8t + g
                asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(scale) : "r"(stage + K3_UNIT_VALUES + 4 * (8 * t + g)));
                const int pos = first + K3_UNIT_KEYS * (warp + K3_WARPS * i) + 8 * t + g;
                if (pos < context_len)
                    logits[(size_t)(b * NEXT_N + j) * max_context_len + pos] =
                        from_float<T>(pos < row_len_of(lens, b, j, context_len) ? total * scale : NEG_INF);
            }
        }
        cp_async_wait<0>();
    }

    if (clean_logits) fill_past_contexts(logits, lens, B, max_context_len, K3_WARPS);
}

PAGED_ENTRY(paged_mqa_logits_warps_h64_n1, __launch_bounds__(K3_THREADS, CTAS_PER_SM), paged_mqa_logits_warps, 64, 1)
PAGED_ENTRY(paged_mqa_logits_warps_h64_n2, __launch_bounds__(K3_THREADS, CTAS_PER_SM), paged_mqa_logits_warps, 64, 2)
PAGED_ENTRY(paged_mqa_logits_warps_h32_n1, __launch_bounds__(K3_THREADS, CTAS_PER_SM), paged_mqa_logits_warps, 32, 1)
PAGED_ENTRY(paged_mqa_logits_warps_h32_n2, __launch_bounds__(K3_THREADS, CTAS_PER_SM), paged_mqa_logits_warps, 32, 2)

// ------------------------------------------------------------------------------------ kernel 4
//
// At next_n = 2 kernel 3 needs about 600 TFLOP/s of tensor-core math to read the cache at 60% of
// copy bandwidth, more than mma.sync gives on the H200 (about 360). Kernel 4
// (paged_mqa_logits_wgmma_h64_n1 / _h64_n2 / _h32_n1 / _h32_n2, sm_90a only) moves the product to
// wgmma (cuda/wgmma.cuh), which takes e4m3 straight from shared memory at Hopper's full FP8 rate:
// * 2 warpgroups a block, two blocks an SM; each warpgroup owns a cp.async ring of K4_STAGES whole
//   physical blocks (64 tokens: 8192 value bytes, swizzled = wgmma's 128-byte swizzle, and 256 scale
//   bytes) and walks the run's blocks u = wg, wg + 2, ... with a barrier of its own 128 threads only
//   (bar.sync 1 + wg), so the two warpgroups drift like kernel 3's warps;
// * B is q[b] for all next_n draft positions and H heads: N = next_n H rows of 128 bytes (the rows
//   (j, h) of q[b] are contiguous), written to shared memory once per run, between two block barriers;
// * per physical block: 4 wgmma m64nNk32 (the 4 slices of D) give scores[64 tokens][(j, h)] in N / 2
//   registers a thread, then the epilogue of cuda/wgmma.cuh (ReLU, times w, head sums over the
//   thread's columns and the 4 lanes of a row) and lane t < 2 next_n stores (draft j = t / 2, row
//   16 warp + g + 8 (t % 2)) times k_scale: 16 consecutive floats a warp and draft position;
// * block ids: lane k of each warp fetches the id of the warpgroup's unit i0 + k once per K4_IDS units.
// Same bounds, stores and -inf fill as kernel 1.
#include "wgmma.cuh"  // WGMMA_AVAILABLE, wgmma_*, fence_*, named_barrier_sync, weighted_relu_head_sums,
                      // sum_for_lane

#define K4_WARPGROUPS 2
#define K4_THREADS (128 * K4_WARPGROUPS)
#define K4_STAGES 5                                // physical blocks in a warpgroup's ring
#define K4_IDS 32                                  // block ids a warp fetches at once (one a lane)
// Dynamic shared memory for N = next_n H rows of q: K4_SMEM_ALIGN (slack: the kernel rounds its base up to
// a 1024-byte boundary, where a 128-byte-swizzled wgmma tile must start) + N * K4_SMEM_PER_ROW +
// K4_SMEM_STAGES bytes
#define K4_SMEM_ALIGN 1024
#define K4_SMEM_PER_ROW (HEAD_DIM + 4)                            // a q row (e4m3) of the B tile, and its weight
#define K4_SMEM_STAGES (K4_WARPGROUPS * K4_STAGES * BLOCK_BYTES)  // the warpgroups' rings: values and scales

// Copy the physical block at `block` into a warpgroup's stage (wtid = 0 .. 127): values swizzled
// (row = token), then its 64 scales as they are.
__device__ __forceinline__ void k4_load_block(unsigned char* values, float* scales, const unsigned char* block, int wtid) {
    #pragma unroll
    for (int i = 0; i < VALUE_BYTES / 16 / 128; ++i) {
        const int c = wtid + 128 * i;
        cp_async_16(values + swizzled(c / CHUNKS_PER_ROW, c % CHUNKS_PER_ROW), block + c * 16);
    }
    if (wtid < BLOCK_KV * 4 / 16) cp_async_16(reinterpret_cast<unsigned char*>(scales) + wtid * 16, block + VALUE_BYTES + wtid * 16);
}

// Dynamic shared memory, K4_SMEM_ALIGN-byte aligned inside: the q tile [N][128], the rings' values
// [K4_WARPGROUPS][K4_STAGES][8192] and scales [K4_WARPGROUPS][K4_STAGES][64], w [N]: N K4_SMEM_PER_ROW +
// K4_SMEM_STAGES bytes after the alignment slack.
template <int H, int NEXT_N, typename T>
__device__ void paged_mqa_logits_wgmma(const unsigned char* __restrict__ q, const unsigned char* __restrict__ kv_cache,
                                       const float* __restrict__ weights, const int* __restrict__ context_lens,
                                       int lens_per_row, const int* __restrict__ block_table,
                                       const int* __restrict__ schedule_meta, T* __restrict__ logits,
                                       int B, int /* next_n = NEXT_N */, int max_blocks,
                                       int num_blocks, int max_context_len, int clean_logits) {
#if WGMMA_AVAILABLE
    constexpr int N = NEXT_N * H;  // B rows: (draft position j, head h)
    const Lengths lens = {context_lens, NEXT_N, lens_per_row, context_limit(max_context_len, max_blocks, num_blocks)};
    extern __shared__ unsigned char k4_smem_raw[];
    unsigned char* q_tile = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<size_t>(k4_smem_raw) + K4_SMEM_ALIGN - 1) & ~size_t(K4_SMEM_ALIGN - 1));
    unsigned char* values_all = q_tile + N * HEAD_DIM;
    float* scales_all = reinterpret_cast<float*>(values_all + K4_WARPGROUPS * K4_STAGES * VALUE_BYTES);
    float* w_s = scales_all + K4_WARPGROUPS * K4_STAGES * BLOCK_KV;

    const int wg = threadIdx.x / 128, wtid = threadIdx.x % 128;
    const int lane = threadIdx.x % 32, warp = wtid / 32;  // warp: within the warpgroup
    const int g = lane / 4, t = lane % 4;
    unsigned char* values = values_all + wg * K4_STAGES * VALUE_BYTES;
    float* scales = scales_all + wg * K4_STAGES * BLOCK_KV;
    const unsigned long long b_desc = wgmma_desc(smem_address(q_tile));
    const unsigned w_lane = smem_address(w_s + 2 * t);

    for (int b = first_run(schedule_meta); ; ++b) {  // runs: the blocks of one batch, as in kernel 3
        int context_len, n_begin, n_end;
        if (!schedule_run(schedule_meta, lens, B, b, max_blocks, context_len, n_begin, n_end)) break;
        if (n_begin >= n_end) continue;  // an empty context (block-uniform)
        const int n_units = n_end - n_begin;  // physical blocks of the run
        const int my_units = wg < n_units ? (n_units - wg + K4_WARPGROUPS - 1) / K4_WARPGROUPS : 0;
        const int* ids_row = block_table + (size_t)b * max_blocks + n_begin;

        // unit i of this warpgroup is the run's block u = wg + K4_WARPGROUPS i; lane k of every warp
        // holds the physical id of unit i0 + k (i0 a multiple of K4_IDS)
        int ids = 0;
        auto issue = [&](int i) {
            if (i % K4_IDS == 0) {
                const int u = wg + K4_WARPGROUPS * (i + lane);
                ids = u < n_units ? ids_row[u] : 0;
            }
            const int physical = __shfl_sync(0xffffffffu, ids, i % K4_IDS);
            k4_load_block(values + (i % K4_STAGES) * VALUE_BYTES, scales + (i % K4_STAGES) * BLOCK_KV,
                          cache_block(kv_cache, physical, num_blocks), wtid);
        };

        __syncthreads();  // both warpgroups are done with the previous run (its q tile and w)
        #pragma unroll
        for (int s = 0; s < K4_STAGES - 1; ++s) {  // prologue: in flight while q is copied
            if (s < my_units) issue(s);
            cp_async_commit();
        }
        // q[b] -> the B tile (row n = j H + h of q[b], swizzled), w[b next_n + j, h] -> w_s[n]
        for (int c = threadIdx.x; c < N * CHUNKS_PER_ROW; c += K4_THREADS) {
            const int row = c / CHUNKS_PER_ROW, chunk = c % CHUNKS_PER_ROW;
            *reinterpret_cast<uint4*>(q_tile + swizzled(row, chunk)) =
                *reinterpret_cast<const uint4*>(q + ((size_t)b * N + row) * HEAD_DIM + chunk * 16);
        }
        for (int n = threadIdx.x; n < N; n += K4_THREADS) w_s[n] = weights[(size_t)b * N + n];
        fence_proxy_async();  // the q tile, written by ordinary stores, is read by the tensor cores
        __syncthreads();

        #pragma unroll 1
        for (int i = 0; i < my_units; ++i) {
            cp_async_wait<K4_STAGES - 2>();
            fence_proxy_async();
            named_barrier_sync(1 + wg, 128);  // unit i has landed for the warpgroup; unit i - 1 is done
            if (i + K4_STAGES - 1 < my_units) issue(i + K4_STAGES - 1);
            cp_async_commit();

            // scores[token][(j, h)] = k[token] . q[b, j, h] for the block's 64 tokens, 4 k-steps of 32
            const int stage = i % K4_STAGES;
            const unsigned long long a_desc = wgmma_desc(smem_address(values + stage * VALUE_BYTES));
            float acc[N / 2];
            wgmma_fence();
            #pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 32; ++kk) wgmma_m64k32_e4m3<N>(acc, a_desc + 2 * kk, b_desc + 2 * kk, kk);
            wgmma_commit();
            wgmma_wait<0>();
            fence_operands(acc);

            float sums[NEXT_N][2];  // [j][row 16 warp + g, + 8]: sum_h w ReLU(score), over all 4 lanes
            weighted_relu_head_sums<N, H>(acc, w_lane, sums);
            if (t < 2 * NEXT_N) {  // lane t stores draft position j = t / 2, row 16 warp + g + 8 (t % 2)
                const int j = t / 2, r = t % 2;
                const float total = sum_for_lane(sums, t);
                const int slot = 16 * warp + g + 8 * r;
                const int pos = (n_begin + wg + K4_WARPGROUPS * i) * BLOCK_KV + slot;
                if (pos < context_len)
                    logits[(size_t)(b * NEXT_N + j) * max_context_len + pos] = from_float<T>(
                        pos < row_len_of(lens, b, j, context_len) ? total * scales[stage * BLOCK_KV + slot] : NEG_INF);
            }
        }
        cp_async_wait<0>();
    }

    if (clean_logits) fill_past_contexts(logits, lens, B, max_context_len, K4_THREADS / 32);
#else
    __trap();  // wgmma needs sm_90a; dsa_tutorial never launches this kernel elsewhere
#endif
}

PAGED_ENTRY(paged_mqa_logits_wgmma_h64_n1, __launch_bounds__(K4_THREADS, CTAS_PER_SM), paged_mqa_logits_wgmma, 64, 1)
PAGED_ENTRY(paged_mqa_logits_wgmma_h64_n2, __launch_bounds__(K4_THREADS, CTAS_PER_SM), paged_mqa_logits_wgmma, 64, 2)
PAGED_ENTRY(paged_mqa_logits_wgmma_h32_n1, __launch_bounds__(K4_THREADS, CTAS_PER_SM), paged_mqa_logits_wgmma, 32, 1)
PAGED_ENTRY(paged_mqa_logits_wgmma_h32_n2, __launch_bounds__(K4_THREADS, CTAS_PER_SM), paged_mqa_logits_wgmma, 32, 2)

// ------------------------------------------------------------------------------------ kernel 5
//
// What holds kernel 4 back at next_n = 2 (H200: 0.73x DeepGEMM, 63-72% of copy bandwidth, where next_n = 1
// reaches 88-94%): the bytes are the same at both next_n, the math doubles, and a warpgroup does
// everything in turn: its 128 threads issue the cp.async copies of a block (swizzle arithmetic, 5 copies a
// thread), wait for them at a barrier, issue the wgmma, wait for the wgmma, then run the epilogue while
// the tensor cores sit idle unless another warpgroup has work queued. Kernel 5
// (paged_mqa_logits_tma_h64_n1 / ..., sm_90a only) keeps kernel 4's math and schedule, and changes who
// moves the data and what overlaps what:
//
// * TMA for the cache. Seen as rows of 128 bytes, the cache [num_blocks][64][132] is a 2-D tensor of
//   num_blocks x 66 rows: block id's values are rows 66 id .. 66 id + 63 and its scales rows 66 id + 64
//   and 65. One tensor map (128-byte swizzle, box 64 rows) copies the values of a block into a ring stage
//   already in wgmma's layout; its 256 bytes of scales come by cp.async.bulk (a plain bulk copy, no map),
//   both counted on the stage's mbarrier (8448 bytes). q[b] (N = next_n H rows) and w[b] come by TMA too.
// * One producer warp (the block's last) walks the schedule exactly as the consumers do and keeps the
//   ring of K5_STAGES blocks full (lane k fetches the block id of unit u0 + k, once per 32 units); the
//   two consumer warpgroups take the blocks alternately by their unit over the whole walk (consumer c
//   computes the units = c mod 2, so stage s always belongs to consumer s % 2 and its waits on full[s]
//   see every phase in turn), wait on full[stage], and release it through empty[stage] (one arrival a
//   thread, after its own reads) as soon as their wgmma have read it. q and w are double-buffered
//   (q_full / q_empty per buffer), so a new run's q lands while the last run's blocks are still being
//   computed: no block-wide barrier after the start.
// * Where the registers allow (N = next_n H <= 64: one draft token at H = 64), the product of the
//   consumer's next block is issued before the epilogue of this one, into a second accumulator set, so
//   the tensor cores compute one block while the warpgroup sums the other's heads (wgmma_wait<1>). At
//   N = 128 two sets (2 x 64 accumulators a thread) do not fit the 112 registers a thread that two
//   blocks an SM leave, and a block's wgmma and epilogue run in turn, as in kernel 4; the other three
//   consumers of the SM fill the tensor cores meanwhile. (Splitting N = 128 into the two draft positions,
//   m64n64 each, pipelined, was tried: it reads every block from shared memory twice and measured 15 to
//   18% slower than kernel 4 on the H200 at 32K and 64K contexts, batch 128 and 256.)
//
//   producer warp   q(b0) k0 k1 .. k7 | wait empty[0] k8 | ...   q(b1) ...
//   consumer 0      wait full[0]: wgmma k0 | wgmma k2, release k0, epilogue k0 | wgmma k4, release k2, ...
//   consumer 1      wait full[1]: the same on k1, k3, ...
//
// setmaxnreg is not used: with two blocks an SM (the schedule's CTAS_PER_SM) the producer is one warp,
// not a warpgroup, so there are no registers to move to the consumers.
//
// Shared memory (1024-byte aligned inside): values [K5_STAGES][64][128], q [2][N][128], scales
// [K5_STAGES][64], w [2][N], mbarriers full[K5_STAGES], empty[K5_STAGES], q_full[2], q_empty[2].
// Bounds are kernel 4's, for ANY values: context lengths, block ids and schedule entries clipped as
// there; the TMA row of a block is 66 x its clipped id (dsa_tutorial refuses caches of 66 num_blocks >= 2^31
// rows and B N >= 2^31 q rows for this kernel, whose coordinates are int32); stores only below each
// run's context_len, -inf past each row's length.

#define K5_CONSUMERS 2
#define K5_THREADS (128 * K5_CONSUMERS + 32)   // two consumer warpgroups, then the producer warp
#define K5_STAGES 8                            // physical blocks in the ring (shared by both consumers)
#define K5_ROWS_PER_BLOCK (BLOCK_BYTES / HEAD_DIM)  // 66: a cache block as rows of 128 bytes (tensor map)
#define K5_SCALE_BYTES (BLOCK_KV * 4)          // 256
#define K5_BARRIERS (2 * K5_STAGES + 4)
// Dynamic shared memory for N = next_n H rows of q: WGMMA_SMEM_ALIGN + K5_FIXED_SMEM + N * K5_SMEM_PER_ROW
#define K5_FIXED_SMEM (K5_STAGES * (VALUE_BYTES + K5_SCALE_BYTES) + 8 * K5_BARRIERS)
#define K5_SMEM_PER_ROW (2 * (HEAD_DIM + 4))   // two buffers of a q row and its weight
static_assert(BLOCK_BYTES % HEAD_DIM == 0, "a cache block is a whole number of 128-byte rows");
static_assert(K5_STAGES % K5_CONSUMERS == 0, "stage s belongs to consumer s % K5_CONSUMERS");

template <int H, int NEXT_N, typename T>
__device__ void paged_mqa_logits_tma(const TensorMap& q_map, const TensorMap& values_map, const TensorMap& w_map,
                                     const unsigned char* __restrict__ kv_cache, const int* __restrict__ context_lens,
                                     int lens_per_row, const int* __restrict__ block_table,
                                     const int* __restrict__ schedule_meta, T* __restrict__ logits, int B,
                                     int max_blocks, int num_blocks, int max_context_len, int clean_logits) {
#if WGMMA_AVAILABLE
    constexpr int N = NEXT_N * H;  // q rows of a batch: (draft position j, head h)
    constexpr bool PING_PONG = N <= 64;  // two accumulator sets of N / 2 fit the 112 registers
    const Lengths lens = {context_lens, NEXT_N, lens_per_row, context_limit(max_context_len, max_blocks, num_blocks)};
    extern __shared__ unsigned char k5_smem_raw[];
    unsigned char* values_s = align_smem(k5_smem_raw);                       // [K5_STAGES][64][128]
    unsigned char* q_s = values_s + K5_STAGES * VALUE_BYTES;                 // [2][N][128]
    float* scales_s = reinterpret_cast<float*>(q_s + 2 * N * HEAD_DIM);      // [K5_STAGES][64]
    float* w_s = scales_s + K5_STAGES * BLOCK_KV;                            // [2][N]
    const unsigned full = smem_address(w_s + 2 * N), empty = full + 8 * K5_STAGES;
    const unsigned q_full = empty + 8 * K5_STAGES, q_empty = q_full + 16;

    const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    if (threadIdx.x == 0) {
        for (int s = 0; s < K5_STAGES; ++s) {
            mbarrier_init(full + 8 * s, 1);     // the producer's arrive.expect_tx (+ the bytes)
            mbarrier_init(empty + 8 * s, 128);  // every thread of the consumer that owns the stage
        }
        for (int b = 0; b < 2; ++b) {
            mbarrier_init(q_full + 8 * b, 1);
            mbarrier_init(q_empty + 8 * b, 128 * K5_CONSUMERS);  // every consumer thread
        }
        fence_mbarrier_init();
    }
    __syncthreads();  // the barriers are initialised before anybody uses them (the only block-wide barrier)

    if (warpgroup == K5_CONSUMERS) {
        // ---------------------------------------------------------------- the producer warp
        if (lane == 0) {
            prefetch_tensor_map(q_map);
            prefetch_tensor_map(values_map);
            prefetch_tensor_map(w_map);
        }
        int unit = 0, run = 0;  // units (blocks) and non-empty runs this block has walked so far
        for (int b = first_run(schedule_meta); ; ++b) {
            int context_len, n_begin, n_end;
            if (!schedule_run(schedule_meta, lens, B, b, max_blocks, context_len, n_begin, n_end)) break;
            if (n_begin >= n_end) continue;
            const int buffer = run % 2;
            mbarrier_wait(q_empty + 8 * buffer, ((run / 2) & 1) ^ 1);  // both consumers are done with it
            if (lane == 0) {
                mbarrier_arrive_expect_tx(q_full + 8 * buffer, N * (HEAD_DIM + 4));
                tma_load_2d(smem_address(q_s + buffer * N * HEAD_DIM), q_map, 0, b * N, q_full + 8 * buffer);
                tma_load_2d(smem_address(w_s + buffer * N), w_map, 0, b * NEXT_N, q_full + 8 * buffer);
            }
            const int* ids_row = block_table + (size_t)b * max_blocks + n_begin;
            int ids = 0;
            for (int u = 0; u < n_end - n_begin; ++u, ++unit) {
                if (u % 32 == 0) ids = u + lane < n_end - n_begin ? ids_row[u + lane] : 0;
                const int id = min(max(__shfl_sync(0xffffffffu, ids, u % 32), 0), num_blocks - 1);
                const int stage = unit % K5_STAGES;
                mbarrier_wait(empty + 8 * stage, ((unit / K5_STAGES) & 1) ^ 1);  // its last block is computed
                if (lane == 0) {
                    mbarrier_arrive_expect_tx(full + 8 * stage, BLOCK_BYTES);
                    tma_load_2d(smem_address(values_s + stage * VALUE_BYTES), values_map, 0, id * K5_ROWS_PER_BLOCK,
                                full + 8 * stage);
                    bulk_load(smem_address(scales_s + stage * BLOCK_KV),
                              kv_cache + (size_t)id * BLOCK_BYTES + VALUE_BYTES, K5_SCALE_BYTES, full + 8 * stage);
                }
            }
            ++run;
        }
        return;  // nothing waits for the producer; the consumers wait for every copy it issued
    }

    // -------------------------------------------------------------------- the consumers
    const int g = lane / 4, t = lane % 4;
    const int slot = 16 * warp + g + 8 * (t % 2);  // the token (row of the block) this lane stores, t < 2
    int unit = 0, run = 0;
    for (int b = first_run(schedule_meta); ; ++b) {
        int context_len, n_begin, n_end;
        if (!schedule_run(schedule_meta, lens, B, b, max_blocks, context_len, n_begin, n_end)) break;
        if (n_begin >= n_end) continue;
        const int n_units = n_end - n_begin, first_unit = unit;
        unit += n_units;
        const int buffer = run++ % 2;
        // this consumer's blocks of the run: u = u0 + 2 i, i < my_units, where u0 makes first_unit + u (the
        // unit over the whole walk) = warpgroup mod 2, so that stage s is always computed by consumer s % 2:
        // its own waits then see every phase of full[s] in turn (assigned per run, a run of odd length would
        // hand a stage to the other consumer, whose wait on a parity could pass on the phase before)
        const int u0 = (unsigned)(warpgroup + K5_CONSUMERS - first_unit % K5_CONSUMERS) % K5_CONSUMERS;
        const int my_units = u0 < n_units ? (n_units - u0 + K5_CONSUMERS - 1) / K5_CONSUMERS : 0;
        // lane t < 2 NEXT_N stores draft position j = t / 2, token 16 warp + g + 8 (t % 2): its row's length
        const int lane_j = min(t / 2, NEXT_N - 1), lane_len = row_len_of(lens, b, lane_j, context_len);
        const unsigned long long b_desc = wgmma_desc(smem_address(q_s + buffer * N * HEAD_DIM));
        const unsigned w_lane = smem_address(w_s + buffer * N + 2 * t);
        mbarrier_wait(q_full + 8 * buffer, ((run - 1) / 2) & 1);  // (acquire) q[b] and w[b] have landed

        // Block i of this consumer: issue its 4 wgmma m64nNk32 into acc (after waiting for the block, and
        // reading the lane's k_scale from the stage while it is there); finish it once waited for: release
        // the stage, epilogue (kernel 4's) and store.
        auto issue = [&](int i, float (&acc)[N / 2], float& scale) {
            const int g_unit = first_unit + u0 + K5_CONSUMERS * i, stage = g_unit % K5_STAGES;
            mbarrier_wait(full + 8 * stage, (g_unit / K5_STAGES) & 1);  // (acquire) the block has landed
            scale = scales_s[stage * BLOCK_KV + slot];
            const unsigned long long a_desc = wgmma_desc(smem_address(values_s + stage * VALUE_BYTES));
            wgmma_fence();
            #pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 32; ++kk) wgmma_m64k32_e4m3<N>(acc, a_desc + 2 * kk, b_desc + 2 * kk, kk);
            wgmma_commit();
        };
        auto finish = [&](int i, float (&acc)[N / 2], float scale) {
            const int u = u0 + K5_CONSUMERS * i;
            fence_operands(acc);
            mbarrier_arrive(empty + 8 * ((first_unit + u) % K5_STAGES));  // (release) its wgmma and scale read
            float sums[NEXT_N][2];  // [j][row 16 warp + g, + 8]: sum_h w ReLU(score), over all 4 lanes
            weighted_relu_head_sums<N, H>(acc, w_lane, sums);
            if (t < 2 * NEXT_N) {
                const int pos = (n_begin + u) * BLOCK_KV + slot;
                if (pos < context_len)
                    logits[(size_t)(b * NEXT_N + lane_j) * max_context_len + pos] =
                        from_float<T>(pos < lane_len ? sum_for_lane(sums, t) * scale : NEG_INF);
            }
        };

        if constexpr (PING_PONG) {
            float acc[2][N / 2], scale[2];
            if (my_units > 0) issue(0, acc[0], scale[0]);
            #pragma unroll 1
            for (int i = 0; i < my_units; i += 2) {  // blocks i (acc[0]) and i + 1 (acc[1])
                if (i + 1 < my_units) {
                    issue(i + 1, acc[1], scale[1]);
                    wgmma_wait<1>();
                } else {
                    wgmma_wait<0>();
                }
                finish(i, acc[0], scale[0]);
                if (i + 1 < my_units) {
                    if (i + 2 < my_units) {
                        issue(i + 2, acc[0], scale[0]);
                        wgmma_wait<1>();
                    } else {
                        wgmma_wait<0>();
                    }
                    finish(i + 1, acc[1], scale[1]);
                }
            }
        } else {
            float acc[N / 2], scale;
            #pragma unroll 1
            for (int i = 0; i < my_units; ++i) {
                issue(i, acc, scale);
                wgmma_wait<0>();
                finish(i, acc, scale);
            }
        }
        mbarrier_arrive(q_empty + 8 * buffer);  // (release) this thread is done with q[b], w[b]
    }

    if (clean_logits) fill_past_contexts(logits, lens, B, max_context_len, 4 * K5_CONSUMERS);
#else
    __trap();  // wgmma and TMA need sm_90a; dsa_tutorial never launches this kernel elsewhere
#endif
}

// The entry points of kernel 5: the three tensor maps (q, the cache's values, w) by value, then kernel 4's
// arguments but q and weights (read through the maps).
#define PAGED_TMA_ENTRY_T(NAME, H, NEXT_N, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(K5_THREADS, CTAS_PER_SM)                                        \
        NAME(const __grid_constant__ TensorMap q_map, const __grid_constant__ TensorMap values_map,              \
             const __grid_constant__ TensorMap w_map, const unsigned char* kv_cache, const int* context_lens,    \
             int lens_per_row, const int* block_table, const int* schedule_meta, T* logits, int B,               \
             int max_blocks, int num_blocks, int max_context_len, int clean_logits) {                            \
        paged_mqa_logits_tma<H, NEXT_N, T>(q_map, values_map, w_map, kv_cache, context_lens, lens_per_row,       \
                                           block_table, schedule_meta, logits, B, max_blocks, num_blocks,        \
                                           max_context_len, clean_logits);                                       \
    }
#define PAGED_TMA_ENTRY(NAME, H, NEXT_N)                                                                       \
    PAGED_TMA_ENTRY_T(NAME##_f32, H, NEXT_N, float)                                                            \
    PAGED_TMA_ENTRY_T(NAME##_bf16, H, NEXT_N, __nv_bfloat16)
PAGED_TMA_ENTRY(paged_mqa_logits_tma_h64_n1, 64, 1)
PAGED_TMA_ENTRY(paged_mqa_logits_tma_h64_n2, 64, 2)
PAGED_TMA_ENTRY(paged_mqa_logits_tma_h32_n1, 32, 1)
PAGED_TMA_ENTRY(paged_mqa_logits_tma_h32_n2, 32, 2)
