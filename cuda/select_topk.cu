// Top-k selection by radix select, one block per row:   S_t = Top-k(I_t,:) over s <= position of t
//
// Checked against dsa_tutorial.topk.select_topk, bit for bit: the same set, the same order;
// launched by dsa_tutorial.topk.select_topk_cuda (its table SELECT_TOPK_KERNELS lists the versions).
//
//   scores float32 [rows, S] (rows = B * T), query_positions int64 [T] (the last visible position
//   of each query, or a null pointer for the causal default S - T + t), out int32 [rows, k]: the
//   selected positions in increasing order, then -1 in the slots a short row leaves over.
//
// The rules (module docstring of dsa_tutorial/topk.py):
//   * candidates are the visible positions s <= position of t whose score is not NaN; -inf is an
//     ordinary score. A position outside [0, S) is clamped (visible_end): whatever the values in
//     query_positions, a block reads only its own row;
//   * larger value first, +0.0 == -0.0, and among equal values the lower position wins.
//
// The idea. Sorting a row of 131072 scores to keep 2048 of them is wasteful: we only need the
// k-th largest value, the threshold. Map every float to a uint32 key whose unsigned order is the
// float order (order_key), then find the threshold key one digit at a time, most significant
// digit first, as a radix sort would, but following only the bucket that holds the k-th key:
//
//   pass 1: histogram of bits 31..21 (2048 buckets) of all candidate keys. Walking the buckets
//           from the top, the running count crosses k inside one bucket B1: every key in a
//           higher bucket is selected, and the threshold starts with the digit B1.
//   pass 2: histogram of bits 20..10 of the keys whose top digit is B1; the count still needed
//           crosses inside bucket B2.
//   pass 3: the same on bits 9..0: now the threshold key K is known exactly, and r, the number
//           of keys equal to K that are still needed (the lowest r positions among them win).
//   pass 4: walk the row in order; key > K, or key == K among the first r such, is selected.
//           A block-wide prefix sum over each chunk gives every selected element its output slot,
//           so the output comes out in increasing position with no sort at all.
//
// The progression, each kernel a complete answer:
//   kernel 1  select_topk_four_passes  the four passes above, each one a read of the whole row
//             from global memory. Simple, but passes 2 and 3 read 131072 scores to look at the
//             few thousand of bucket B1.
//   kernel 2  select_topk_compact      two reads of the row. Read 1 is pass 1 (float4 loads).
//             Read 2 keeps, in position order, every key in bucket B1 or above (the selected keys
//             and the few thousand whose fate passes 2-3 decide) with its position: a short list
//             in shared memory. Passes 2, 3 and 4 then run on that list, not on the row.
//             A row whose list does not fit (a long run of equal scores right at the threshold)
//             falls back to kernel 1's four passes: the same answer, slower.
//   kernel 3  select_topk_shared       one read of the row, into shared memory (rows up to
//             TOPK_SMEM_MAX_S). What limits kernel 2 on short rows (8192 x 8192: 8192 blocks of
//             32 KiB rows) is not bytes: it reads 512 MB where 256 MB would do (120 us at 4.25 TB/s),
//             yet takes 645 us. A block of 1024 threads and a 72 KiB list leaves 2 blocks on an SM,
//             and each spends most of its time in barriers (scans, histogram walks) with no load in
//             flight. Kernel 3 reads the row once, float4, storing the keys in shared memory (32 KiB
//             for 8192 scores) and building the pass-1 histogram on the way; passes 2, 3 (scans of
//             the keys in shared memory) and the ordered pass run there. Blocks of 512 threads with
//             registers capped for 3 blocks an SM (40 KiB of shared memory each at 8192 scores): one
//             block's passes overlap the others' reads. The ordered pass needs no scan per chunk:
//             each warp owns a contiguous run of the keys, counts its selections (one warp
//             reduction), one barrier gives each warp its offset, and a warp-wide prefix sum per 32
//             float4s places every selected position.
//             Measured (H200, every score visible): 8192 x 8192 in 311 us (kernel 2 645 us,
//             torch.topk unsorted 955 us: 3.1x); 209 us with the causal default positions (row t
//             sees t + 1 scores). The one read is 60 us of it: the rest is the passes in shared
//             memory, 8192 blocks in waves of 396.
//   kernel 4  select_topk_sampled      a sample instead of read 1, then one read (long rows).
//             128 x 131072 is 128 blocks on 132 SMs: each SM pulls a 512 KiB row through one
//             block, and kernel 2 reads it twice (70 us; one read of the 64 MB at 4.25 TB/s is
//             15 us). Read 1 only finds the bucket B1 of the k-th key, and a slightly lower bucket
//             does as well: the list then holds a few more keys. Kernel 4 histograms a sample, one
//             float4 in TOPK_SAMPLE_STRIDE (16) of the row (1/16 of the loads, 1/8 of the DRAM
//             sectors), and takes the bucket where the sample's count from the top reaches twice its
//             share of k (2 k / 16 + 16). One read then builds the list of every key at or above that
//             bucket (kernel 2's read 2), and passes 1-4 run on the list: about 5000 entries for
//             random scores at 131072 (TOPK_SAMPLED_LIST: 12288 entries, 96 KiB). The list holds
//             the k largest as soon as it holds k keys; a wrong guess (fewer than k keys at or above
//             it, or more than the list holds: a row unlike its sample, long runs of ties) runs
//             kernel 2's answer instead: the same result, two reads more.
//             Measured (H200, every score visible): 128 x 131072 in 51 us (kernel 2 70 us,
//             torch.topk 272 us: 5.3x, short of the 28 us aimed at); 2048 x 65536 in 445 us (kernel
//             2 510 us, torch.topk 1630 us: 3.7x). Loads in flight are not what limits it now: a
//             version that staged the read through a 128 KiB ring in shared memory with cp.async
//             (two 64 KiB chunks in flight an SM instead of one, no registers held) measured the
//             same 51 us. One block of 1024 threads at 64 registers (the whole register file of
//             an SM) runs the sample, 8 chunks of the read with a block-wide scan each, and the
//             passes on the list one after the other; the next step is to time those phases apart.
//             A design that was tried and left: the row split over a thread-block cluster of 8
//             blocks, each holding a 64 KiB slice in shared memory, the histograms summed through
//             distributed shared memory (one read, but 64 MB of keys do not fit the 30 MB of shared
//             memory of 132 SMs at once: 4 waves of 264 blocks, each with 5 cluster barriers and 3
//             cluster-wide histogram sums). It ran at 150 us on 128 x 131072, 97 us with the
//             remote histogram reads left out: slower than kernel 2.
//
// No sort anywhere; torch.topk sorts its candidates. The histograms live in shared memory (8 KiB)
// and are built with shared-memory atomics: a row of many equal scores makes those atomics
// collide (the answer stays right, only slower).

#define TOPK_THREADS 1024        // one block of 1024 threads per row
#define TOPK_MAX_K 2048          // the largest k select_topk_cuda passes (the model's k, what the tests cover)
#define TOPK_MAX_S (1 << 20)     // the longest row it passes (scores per row)
#define TOPK_LIST_MAX 24576      // kernel 2: the most list entries shared memory holds (192 KiB, with the
                                 // 8 KiB histogram under the 227 KiB a block may have); longer lists fall back
#define TOPK_LIST_ENTRY_BYTES 8  // kernel 2: a list entry is a key and a position; dynamic shared memory is
                                 // list_capacity entries (list_capacity <= TOPK_LIST_MAX)
#define TOPK_SMEM_THREADS 512    // kernel 3: threads per block
#define TOPK_SMEM_BLOCKS 3       // kernel 3: blocks an SM at least (registers capped to fit them)
#define TOPK_SMEM_MAX_S 24576    // kernel 3: the longest row it holds in shared memory (96 KiB of keys; a
                                 // multiple of 4, below 2^16: its per-warp counts are packed in 16 bits)
#define TOPK_ONE_BLOCK_S 16384   // the default: kernel 3 for rows up to this long, kernel 4 for longer ones
#define SMEM_LOADS 4             // kernel 3: float4 loads per thread in flight in the read
#define TOPK_SAMPLE_STRIDE 16    // kernel 4: its sample is one float4 in 16 of the row
#define TOPK_SAMPLED_LIST 12288  // kernel 4: list entries in shared memory (96 KiB; at least TOPK_MAX_K)
#define RADIX_BINS 2048  // 11-bit digits: bits 31..21, 20..10, then a 10-bit digit 9..0
#define HIST_ITEMS 8     // scores in flight per thread in the histogram passes (memory parallelism)
#define ITEMS 4          // scores per thread per chunk in the ordered pass
#define LOADS 4          // kernel 2: float4 loads per thread per chunk (64 bytes in flight a thread)

// Order-preserving map float32 -> uint32: key(a) < key(b) exactly when a < b. NaN -> 0, below
// every number (the key of -inf is 0x007FFFFF), so a NaN is never a candidate.
__device__ __forceinline__ unsigned order_key(float score) {
    if (isnan(score)) return 0u;
    unsigned bits = __float_as_uint(score);
    if (bits == 0x80000000u) bits = 0u;  // -0.0 is the same value as +0.0
    // negatives: flip every bit (larger magnitude -> smaller key); the rest: set the sign bit
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Exclusive prefix sum over the block, in thread order; `total` gets the sum of all values.
// Starts with a barrier so the shared scratch of the previous call has been read by everyone.
// NT: the threads of the block (a multiple of 32, at most 1024).
template <typename T, int NT = TOPK_THREADS>
__device__ __forceinline__ T block_exclusive_scan(T value, T& total) {
    constexpr int WARPS = NT / 32;
    __shared__ T warp_totals[WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    T inclusive = value;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const T other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        T warp_sum = lane < WARPS ? warp_totals[lane] : T(0);  // one warp total per lane
        for (int offset = 1; offset < 32; offset <<= 1) {
            const T other = __shfl_up_sync(0xffffffffu, warp_sum, offset);
            if (lane >= offset) warp_sum += other;
        }
        if (lane < WARPS) warp_totals[lane] = warp_sum;  // inclusive sums of the warp totals
    }
    __syncthreads();
    total = warp_totals[WARPS - 1];
    return inclusive - value + (warp > 0 ? warp_totals[warp - 1] : T(0));
}

// The bucket of a RADIX_BINS histogram where the running count from the top bucket reaches
// `remaining` (1 <= remaining <= total; when remaining > total, `bin` is meaningless). Returns, the
// same in every thread: the bucket, `above` (keys in higher buckets), `in_bin` (keys in the bucket)
// and `total` (keys in all buckets). Barriers on entry (the histogram is complete) and on exit
// (everyone has read the results: the histogram and the scratch may be rewritten).
// NT: the threads of the block.
struct Bucket {
    unsigned bin, above, in_bin, total;
};
template <int NT = TOPK_THREADS>
__device__ __forceinline__ Bucket find_bucket(const unsigned* hist, unsigned remaining) {
    constexpr int PER_THREAD = RADIX_BINS / NT;
    __shared__ Bucket found;
    const int tid = threadIdx.x;
    __syncthreads();
    // thread t holds buckets top - PER_THREAD t, top - PER_THREAD t - 1, ...: thread order is
    // descending bucket order, so the exclusive prefix sum of the per-thread counts is the number
    // of keys in higher buckets
    unsigned count[PER_THREAD], sum = 0u;
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        const int bin = RADIX_BINS - 1 - PER_THREAD * tid - j;
        count[j] = hist[bin];
        sum += count[j];
    }
    unsigned total;
    const unsigned above = block_exclusive_scan<unsigned, NT>(sum, total);
    if (tid == 0) found = Bucket{0u, 0u, 0u, total};
    __syncthreads();  // found.total is written before the thread that holds the bucket writes the rest
    unsigned running = above;
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {  // at most one bucket of one thread holds the crossing
        if (running < remaining && remaining <= running + count[j])
            found = Bucket{(unsigned)(RADIX_BINS - 1 - PER_THREAD * tid - j), running, count[j], total};
        running += count[j];
    }
    __syncthreads();
    const Bucket result = found;
    __syncthreads();
    return result;
}

// ---------------------------------------------------------------------------------------------
// kernel 1: four passes over the row in global memory. A device function, because kernel 2 falls
// back to it; `hist` is RADIX_BINS words of shared memory.
__device__ void select_four_passes(const float* __restrict__ row, int end, int* __restrict__ out_row, int k,
                                   unsigned* hist) {
    const int tid = threadIdx.x;
    // ---- passes 1-3: find the threshold key K and r, the number of keys == K to keep
    unsigned prefix = 0u, prefix_mask = 0u;  // the digits of K found so far, and where they are
    unsigned remaining = (unsigned)k;        // keys still to select at or below the current prefix
    bool take_all = false;                   // fewer than k candidates: select every one
    unsigned n_candidates = 0u;
    for (int pass = 0; pass < 3; ++pass) {
        const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        const unsigned digit_mask = pass == 2 ? 0x3FFu : 0x7FFu;
        for (int i = tid; i < RADIX_BINS; i += TOPK_THREADS) hist[i] = 0u;
        __syncthreads();
        // histogram of this digit over the candidates that match the prefix so far
        for (int base = 0; base < end; base += HIST_ITEMS * TOPK_THREADS) {
            unsigned key[HIST_ITEMS];
#pragma unroll
            for (int i = 0; i < HIST_ITEMS; ++i) {  // all loads first, coalesced: lane i reads base + i * 1024 + tid
                const int s = base + i * TOPK_THREADS + tid;
                key[i] = s < end ? order_key(row[s]) : 0u;
            }
#pragma unroll
            for (int i = 0; i < HIST_ITEMS; ++i)
                if (key[i] != 0u && (key[i] & prefix_mask) == prefix) atomicAdd(&hist[(key[i] >> shift) & digit_mask], 1u);
        }
        const Bucket bucket = find_bucket(hist, remaining);  // block-uniform
        if (pass == 0) n_candidates = bucket.total;
        if (pass == 0 && n_candidates <= (unsigned)k) {
            take_all = true;
            break;
        }
        // K starts with this bucket's digit; the keys in higher buckets are all selected
        prefix |= bucket.bin << shift;
        prefix_mask |= digit_mask << shift;
        remaining -= bucket.above;
    }
    // select key > K, and the first r keys == K; "take all" is K = 0, r = 0 (every key > 0)
    const unsigned threshold = take_all ? 0u : prefix;
    const unsigned r = take_all ? 0u : remaining;
    const unsigned n_select = take_all ? n_candidates : (unsigned)k;

    // ---- pass 4: write the selected positions in increasing order
    unsigned greater_before = 0u, equal_before = 0u;  // over all earlier chunks (block-uniform)
    for (int base = 0; base < end; base += ITEMS * TOPK_THREADS) {
        const int first = base + tid * ITEMS;  // this thread's ITEMS consecutive positions
        unsigned key[ITEMS];
        unsigned n_greater = 0u, n_equal = 0u;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            key[i] = first + i < end ? order_key(row[first + i]) : 0u;
            n_greater += key[i] > threshold;
            n_equal += key[i] == threshold && key[i] != 0u;
        }
        // counts of the earlier threads of this chunk; both packed in one word (each < 2^16)
        unsigned chunk_total;
        const unsigned before = block_exclusive_scan(n_greater | (n_equal << 16), chunk_total);
        unsigned greater = greater_before + (before & 0xFFFFu), equal = equal_before + (before >> 16);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            // output slot = selected elements before this one = greater + min(equal, r)
            if (key[i] > threshold) {
                out_row[greater + min(equal, r)] = first + i;
                ++greater;
            } else if (key[i] == threshold && key[i] != 0u) {
                if (equal < r) out_row[greater + equal] = first + i;
                ++equal;
            }
        }
        greater_before += chunk_total & 0xFFFFu;
        equal_before += chunk_total >> 16;
        if (greater_before + min(equal_before, r) >= n_select) break;  // block-uniform: all found
    }
    // -1 in the slots left over when the row has fewer than k candidates
    for (int i = (int)n_select + tid; i < k; i += TOPK_THREADS) out_row[i] = -1;
}

// One past the last visible position of row `row_index`, clamped to [0, S]. Row r is query
// t = r % T of its batch; its last visible position is query_positions[t], or, when no positions
// are given (a null pointer), the causal alignment to the end of the keys: S - T + t. Any int64
// position is safe: it is clamped to [-1, S - 1] before the + 1 (no overflow at INT64_MAX).
__device__ __forceinline__ int visible_end(const long long* __restrict__ query_positions, int T, int S,
                                           int row_index) {
    const int t = row_index % T;
    const long long last = query_positions ? query_positions[t] : (long long)S - T + t;
    return (int)(min(max(last, -1ll), (long long)S - 1) + 1);
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
select_topk_four_passes(const float* __restrict__ scores, const long long* __restrict__ query_positions, int T,
                        int* __restrict__ out, int S, int k) {
    __shared__ unsigned hist[RADIX_BINS];
    const int end = visible_end(query_positions, T, S, blockIdx.x);  // positions [0, end) are visible
    select_four_passes(scores + (size_t)blockIdx.x * S, end, out + (size_t)blockIdx.x * k, k, hist);
}

// ---------------------------------------------------------------------------------------------
// kernel 2: two reads of the row; passes 2-4 on a short list in shared memory.
//
// The row is read as float4 (16 bytes a load) where it is 16-byte aligned: a scalar head of at
// most 3 scores up to the first 16-byte boundary, a body of float4s, a scalar tail of at most 3.
// Every read of the body is coalesced: load i of thread tid is float4 number base + i * 1024 + tid.

// The keys of the 4 scores of one float4; invalid (past the body) -> 0, the key of NaN: no candidate.
__device__ __forceinline__ void load_keys4(const float4* __restrict__ body, int index, int n4, unsigned key[4]) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (index < n4) v = __ldg(body + index);
    key[0] = index < n4 ? order_key(v.x) : 0u;
    key[1] = index < n4 ? order_key(v.y) : 0u;
    key[2] = index < n4 ? order_key(v.z) : 0u;
    key[3] = index < n4 ? order_key(v.w) : 0u;
}

// A list entry: a key in bucket `low_bin` or above (bits 31..21; key 0 = NaN or invisible is never one).
__device__ __forceinline__ bool in_list(unsigned key, unsigned low_bin) { return key != 0u && (key >> 21) >= low_bin; }

// The visible row [0, end) as kernels 2 and 4 read it: [0, head) scalars, [head, tail) float4s
// (n4 of them), [tail, end) scalars.
struct RowParts {
    const float* row;
    const float4* body;
    int end, head, n4, tail;
};
__device__ __forceinline__ RowParts row_parts(const float* row, int end) {
    RowParts p;
    p.row = row;
    p.end = end;
    p.head = min(end, (int)((4u - (unsigned)(reinterpret_cast<size_t>(row) / 4u)) % 4u));
    p.n4 = (end - p.head) / 4;
    p.tail = p.head + 4 * p.n4;
    p.body = reinterpret_cast<const float4*>(row + p.head);
    return p;
}

// A read of the row keeping, in increasing position, every key in bucket `low_bin` or above with
// its position: the list. Returns the number of such keys (the same in every thread); only the
// first `capacity` are written (the caller falls back when there are more).
__device__ unsigned build_list(const RowParts& p, unsigned low_bin, unsigned* list_key, int* list_pos,
                               unsigned capacity) {
    const int tid = threadIdx.x;
    // head and tail (at most 3 scores each): every thread computes the same count, thread 0 writes
    unsigned filled = 0u;  // entries found so far (block-uniform)
    for (int s = 0; s < p.head; ++s) {
        const unsigned key = order_key(p.row[s]);
        if (in_list(key, low_bin)) {
            if (tid == 0 && filled < capacity) {
                list_key[filled] = key;
                list_pos[filled] = s;
            }
            ++filled;
        }
    }
    for (int base = 0; base < p.n4; base += LOADS * TOPK_THREADS) {
        unsigned key[LOADS][4];
        unsigned long long counts = 0ull;  // list entries of load i in bits 16 i .. 16 i + 15 (each <= 4096)
#pragma unroll
        for (int i = 0; i < LOADS; ++i) load_keys4(p.body, base + i * TOPK_THREADS + tid, p.n4, key[i]);  // all loads first
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const unsigned n = in_list(key[i][0], low_bin) + in_list(key[i][1], low_bin) + in_list(key[i][2], low_bin) +
                               in_list(key[i][3], low_bin);
            counts |= (unsigned long long)n << (16 * i);
        }
        // load i of all threads covers float4s base + i * 1024 .. + 1023, in thread order: one scan of the
        // packed counts gives, field by field, the entries of the earlier threads within each load
        unsigned long long totals;
        const unsigned long long before = block_exclusive_scan(counts, totals);
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            unsigned slot = filled + ((unsigned)(before >> (16 * i)) & 0xFFFFu);
            const int first = p.head + 4 * (base + i * TOPK_THREADS + tid);  // position of key[i][0]
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (in_list(key[i][j], low_bin)) {
                    if (slot < capacity) {
                        list_key[slot] = key[i][j];
                        list_pos[slot] = first + j;
                    }
                    ++slot;
                }
            filled += (unsigned)(totals >> (16 * i)) & 0xFFFFu;
        }
    }
    for (int s = p.tail; s < p.end; ++s) {
        const unsigned key = order_key(p.row[s]);
        if (in_list(key, low_bin)) {
            if (tid == 0 && filled < capacity) {
                list_key[filled] = key;
                list_pos[filled] = s;
            }
            ++filled;
        }
    }
    __syncthreads();  // the list is complete
    return filled;
}

// The selection from a complete list (in position order) of list_len <= capacity entries:
// radix passes first_pass .. 2 on the list (the digits of K before first_pass are in prefix,
// prefix_mask; remaining = k minus the keys above them), then pass 4 on the list. take_all:
// every entry is selected (fewer than k candidates).
__device__ void select_from_list(const unsigned* list_key, const int* list_pos, unsigned list_len, int* out_row,
                                 int k, unsigned* hist, int first_pass, unsigned prefix, unsigned prefix_mask,
                                 unsigned remaining, bool take_all) {
    const int tid = threadIdx.x;
    if (!take_all) {
        for (int pass = first_pass; pass < 3; ++pass) {
            const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
            const unsigned digit_mask = pass == 2 ? 0x3FFu : 0x7FFu;
            for (int i = tid; i < RADIX_BINS; i += TOPK_THREADS) hist[i] = 0u;
            __syncthreads();
            for (int i = tid; i < (int)list_len; i += TOPK_THREADS) {
                const unsigned key = list_key[i];
                if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & digit_mask], 1u);
            }
            const Bucket bucket = find_bucket(hist, remaining);
            prefix |= bucket.bin << shift;
            prefix_mask |= digit_mask << shift;
            remaining -= bucket.above;
        }
    }
    const unsigned threshold = take_all ? 0u : prefix;
    const unsigned r = take_all ? 0u : remaining;
    const unsigned n_select = take_all ? list_len : (unsigned)k;

    // ---- pass 4 on the list (already in position order): key > K, or among the first r keys == K
    unsigned greater_before = 0u, equal_before = 0u;  // over all earlier chunks (block-uniform)
    for (int base = 0; base < (int)list_len; base += ITEMS * TOPK_THREADS) {
        const int first = base + tid * ITEMS;  // this thread's ITEMS consecutive list entries
        unsigned key[ITEMS];
        unsigned n_greater = 0u, n_equal = 0u;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            key[i] = first + i < (int)list_len ? list_key[first + i] : 0u;
            n_greater += key[i] > threshold;
            n_equal += key[i] == threshold && key[i] != 0u;
        }
        unsigned chunk_total;
        const unsigned before = block_exclusive_scan(n_greater | (n_equal << 16), chunk_total);
        unsigned greater = greater_before + (before & 0xFFFFu), equal = equal_before + (before >> 16);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            if (key[i] > threshold) {
                out_row[greater + min(equal, r)] = list_pos[first + i];
                ++greater;
            } else if (key[i] == threshold && key[i] != 0u) {
                if (equal < r) out_row[greater + equal] = list_pos[first + i];
                ++equal;
            }
        }
        greater_before += chunk_total & 0xFFFFu;
        equal_before += chunk_total >> 16;
        if (greater_before + min(equal_before, r) >= n_select) break;  // block-uniform: all found
    }
    for (int i = (int)n_select + tid; i < k; i += TOPK_THREADS) out_row[i] = -1;
}

// Kernel 2's whole answer for one row (kernel 4 falls back to it): read 1 (pass 1) gives the
// bucket B1 of the k-th key, read 2 the list of every key in B1 or above, passes 2-4 the rest.
__device__ void select_compact(const RowParts& p, int* __restrict__ out_row, int k, unsigned* list_key,
                               int* list_pos, unsigned capacity, unsigned* hist) {
    const int tid = threadIdx.x;
    // ---- read 1 (pass 1): histogram of bits 31..21 of every candidate key
    for (int i = tid; i < RADIX_BINS; i += TOPK_THREADS) hist[i] = 0u;
    __syncthreads();
    if (tid < p.head) {
        const unsigned key = order_key(p.row[tid]);
        if (key != 0u) atomicAdd(&hist[key >> 21], 1u);
    }
    if (p.tail + tid < p.end) {
        const unsigned key = order_key(p.row[p.tail + tid]);
        if (key != 0u) atomicAdd(&hist[key >> 21], 1u);
    }
    for (int base = 0; base < p.n4; base += LOADS * TOPK_THREADS) {
        unsigned key[LOADS][4];
#pragma unroll
        for (int i = 0; i < LOADS; ++i) load_keys4(p.body, base + i * TOPK_THREADS + tid, p.n4, key[i]);  // all loads first
#pragma unroll
        for (int i = 0; i < LOADS; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (key[i][j] != 0u) atomicAdd(&hist[key[i][j] >> 21], 1u);
    }
    const Bucket b1 = find_bucket(hist, (unsigned)k);  // block-uniform
    // fewer than k candidates: the list is all of them and all are selected (K = 0, r = 0)
    const bool take_all = b1.total <= (unsigned)k;
    const unsigned low_bin = take_all ? 0u : b1.bin;
    const unsigned list_len = take_all ? b1.total : b1.above + b1.in_bin;
    if (list_len > capacity) {  // block-uniform: a long run of ties at the threshold
        select_four_passes(p.row, p.end, out_row, k, hist);
        return;
    }
    // ---- read 2: the list (list_len entries, as counted), then passes 2-4 on it
    build_list(p, low_bin, list_key, list_pos, list_len);
    select_from_list(list_key, list_pos, list_len, out_row, k, hist, 1, b1.bin << 21, 0x7FFu << 21,
                     (unsigned)k - b1.above, take_all);
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
select_topk_compact(const float* __restrict__ scores, const long long* __restrict__ query_positions, int T,
                    int* __restrict__ out, int S, int k, int list_capacity) {
    extern __shared__ __align__(16) unsigned topk_list[];  // dynamic: keys [list_capacity], positions [list_capacity]
    __shared__ unsigned hist[RADIX_BINS];
    const int end = visible_end(query_positions, T, S, blockIdx.x);  // positions [0, end) are visible
    select_compact(row_parts(scores + (size_t)blockIdx.x * S, end), out + (size_t)blockIdx.x * k, k, topk_list,
                   reinterpret_cast<int*>(topk_list + list_capacity), (unsigned)list_capacity, hist);
}

// ---------------------------------------------------------------------------------------------
// kernel 4: a sample instead of read 1, then one read of the row.
//
// Read 1 of kernel 2 only serves to find bucket B1, and any lower bucket would do as well, as long
// as the list stays short: every key of the row at or above a bucket boundary goes to the list, the
// k largest are among them as soon as there are at least k. So kernel 4 estimates the boundary
// from a sample, one float4 in TOPK_SAMPLE_STRIDE of the row: the bucket where the sample's count
// from the top reaches twice its share of k (plus a margin), a boundary a little below the k-th
// key. One full read builds the list (build_list, as kernel 2's read 2); passes 1-4 run on it. When
// the guess was wrong (fewer than k keys at or above it, or more than the list holds), the kernel
// runs kernel 2's answer instead: slower, the same result.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
select_topk_sampled(const float* __restrict__ scores, const long long* __restrict__ query_positions, int T,
                    int* __restrict__ out, int S, int k, int list_capacity) {
    extern __shared__ __align__(16) unsigned topk_list[];  // dynamic: keys [list_capacity], positions [list_capacity]
    __shared__ unsigned hist[RADIX_BINS];
    unsigned* list_key = topk_list;
    int* list_pos = reinterpret_cast<int*>(topk_list + list_capacity);
    const int tid = threadIdx.x;
    const int end = visible_end(query_positions, T, S, blockIdx.x);  // positions [0, end) are visible
    const RowParts p = row_parts(scores + (size_t)blockIdx.x * S, end);
    int* out_row = out + (size_t)blockIdx.x * k;

    // ---- the sample: float4 number TOPK_SAMPLE_STRIDE * i of the body, histogram of bits 31..21
    for (int i = tid; i < RADIX_BINS; i += TOPK_THREADS) hist[i] = 0u;
    __syncthreads();
    const int n_sample = (p.n4 + TOPK_SAMPLE_STRIDE - 1) / TOPK_SAMPLE_STRIDE;
    for (int base = 0; base < n_sample; base += LOADS * TOPK_THREADS) {
        unsigned key[LOADS][4];
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int v = base + i * TOPK_THREADS + tid;
            load_keys4(p.body, v < n_sample ? v * TOPK_SAMPLE_STRIDE : p.n4, p.n4, key[i]);  // past the body: key 0
        }
#pragma unroll
        for (int i = 0; i < LOADS; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (key[i][j] != 0u) atomicAdd(&hist[key[i][j] >> 21], 1u);
    }
    // the sample's share of k, doubled, plus a margin: the boundary lies below the k-th key unless
    // the sample is very unlike the row; a sample with fewer candidates than that: every key (bucket 0)
    const unsigned want = 2u * (((unsigned)k + TOPK_SAMPLE_STRIDE - 1) / TOPK_SAMPLE_STRIDE) + 16u;
    const Bucket guess = find_bucket(hist, want);  // block-uniform
    const unsigned low_bin = guess.total >= want ? guess.bin : 0u;

    // ---- the read: the list of every key in bucket low_bin or above, in increasing position
    const unsigned found = build_list(p, low_bin, list_key, list_pos, (unsigned)list_capacity);
    // all k largest are in the list when it holds at least k keys; with low_bin 0 it holds every
    // candidate, so fewer than k means: select them all
    const bool take_all = low_bin == 0u && found <= (unsigned)k;
    if (found > (unsigned)list_capacity || (found < (unsigned)k && !take_all)) {  // block-uniform: a bad guess
        select_compact(p, out_row, k, list_key, list_pos, (unsigned)list_capacity, hist);
        return;
    }
    select_from_list(list_key, list_pos, found, out_row, k, hist, 0, 0u, 0u, (unsigned)k, take_all);
}

// ---------------------------------------------------------------------------------------------
// kernel 3: one read of the row, into shared memory; every pass after it runs there.
//
// The keys are stored at the same offset from a 16-byte boundary as the scores in global memory:
// the key of position s at keys[s + misalign], misalign = (address of the row) / 4 % 4. Then
// float4 number v of the aligned range is keys[4v .. 4v + 3]: the read is float4 loads and uint4
// stores, every later pass uint4 loads from shared memory (consecutive threads, consecutive 16
// bytes: no bank conflict). The slots before position 0 and from `end` on hold key 0 (no
// candidate), so the passes need no bound but n_vec. Dynamic shared memory: the histogram, then
// the keys, 4 * (RADIX_BINS + round_up(S, 4) + 4) bytes.

// The keys of float4 number v of the aligned range; its components outside the visible [0, end)
// are not read: they get key 0. Only the first and the last float4 straddle.
__device__ __forceinline__ uint4 row_keys4(const float* __restrict__ row, const float4* __restrict__ aligned, int v,
                                           int misalign, int end) {
    const int first = 4 * v - misalign;  // position of component x
    float4 x;
    if (first >= 0 && first + 4 <= end) {
        x = __ldg(aligned + v);
    } else {
        const float nan = __int_as_float(0x7FFFFFFF);
        x.x = first + 0 >= 0 && first + 0 < end ? row[first + 0] : nan;
        x.y = first + 1 >= 0 && first + 1 < end ? row[first + 1] : nan;
        x.z = first + 2 >= 0 && first + 2 < end ? row[first + 2] : nan;
        x.w = first + 3 >= 0 && first + 3 < end ? row[first + 3] : nan;
    }
    return make_uint4(order_key(x.x), order_key(x.y), order_key(x.z), order_key(x.w));
}

// Histogram update of one key (key 0: no candidate).
__device__ __forceinline__ void count_key(unsigned* hist, unsigned key, unsigned prefix, unsigned prefix_mask,
                                          int shift, unsigned digit_mask) {
    if (key != 0u && (key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & digit_mask], 1u);
}

extern "C" __global__ void __launch_bounds__(TOPK_SMEM_THREADS, TOPK_SMEM_BLOCKS)
select_topk_shared(const float* __restrict__ scores, const long long* __restrict__ query_positions, int T,
                   int* __restrict__ out, int S, int k) {
    constexpr int NT = TOPK_SMEM_THREADS, WARPS = NT / 32;
    extern __shared__ __align__(16) unsigned row_smem[];  // dynamic: hist [RADIX_BINS], then the keys
    unsigned* hist = row_smem;
    uint4* keys4 = reinterpret_cast<uint4*>(row_smem + RADIX_BINS);
    __shared__ unsigned warp_counts[WARPS];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const float* row = scores + (size_t)blockIdx.x * S;
    int* out_row = out + (size_t)blockIdx.x * k;
    const int end = visible_end(query_positions, T, S, blockIdx.x);  // positions [0, end) are visible
    const int misalign = (int)((reinterpret_cast<size_t>(row) / 4u) % 4u);
    const float4* aligned = reinterpret_cast<const float4*>(row - misalign);  // read only where visible
    const int n_vec = end > 0 ? (misalign + end + 3) / 4 : 0;  // uint4 of keys: 4 n_vec <= round_up(S, 4) + 4

    // ---- the read (pass 1): keys into shared memory, histogram of bits 31..21
    for (int i = tid; i < RADIX_BINS; i += NT) hist[i] = 0u;
    __syncthreads();
    for (int base = 0; base < n_vec; base += SMEM_LOADS * NT) {
        uint4 key[SMEM_LOADS];
#pragma unroll
        for (int i = 0; i < SMEM_LOADS; ++i) {  // all loads first: SMEM_LOADS * 16 bytes in flight a thread
            const int v = base + i * NT + tid;
            key[i] = v < n_vec ? row_keys4(row, aligned, v, misalign, end) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int i = 0; i < SMEM_LOADS; ++i) {
            const int v = base + i * NT + tid;
            if (v < n_vec) {
                keys4[v] = key[i];
                count_key(hist, key[i].x, 0u, 0u, 21, 0x7FFu);
                count_key(hist, key[i].y, 0u, 0u, 21, 0x7FFu);
                count_key(hist, key[i].z, 0u, 0u, 21, 0x7FFu);
                count_key(hist, key[i].w, 0u, 0u, 21, 0x7FFu);
            }
        }
    }
    const Bucket b1 = find_bucket<NT>(hist, (unsigned)k);  // block-uniform
    const bool take_all = b1.total <= (unsigned)k;  // fewer than k candidates: all selected (K = 0, r = 0)

    // ---- passes 2 and 3 on the keys in shared memory: the threshold key K and r
    unsigned prefix = b1.bin << 21, prefix_mask = 0x7FFu << 21;
    unsigned remaining = (unsigned)k - b1.above;
    if (!take_all) {
        for (int pass = 1; pass < 3; ++pass) {
            const int shift = pass == 1 ? 10 : 0;
            const unsigned digit_mask = pass == 1 ? 0x7FFu : 0x3FFu;
            for (int i = tid; i < RADIX_BINS; i += NT) hist[i] = 0u;
            __syncthreads();
            for (int v = tid; v < n_vec; v += NT) {
                const uint4 key = keys4[v];
                count_key(hist, key.x, prefix, prefix_mask, shift, digit_mask);
                count_key(hist, key.y, prefix, prefix_mask, shift, digit_mask);
                count_key(hist, key.z, prefix, prefix_mask, shift, digit_mask);
                count_key(hist, key.w, prefix, prefix_mask, shift, digit_mask);
            }
            const Bucket bucket = find_bucket<NT>(hist, remaining);
            prefix |= bucket.bin << shift;
            prefix_mask |= digit_mask << shift;
            remaining -= bucket.above;
        }
    }
    const unsigned threshold = take_all ? 0u : prefix;
    const unsigned r = take_all ? 0u : remaining;
    const unsigned n_select = take_all ? b1.total : (unsigned)k;

    // ---- pass 4: the selected positions, in increasing order. Warp w walks its own contiguous
    // range of the keys, 32 uint4 a step; first every warp counts what it selects (key > K; key == K)
    const int per_warp = (n_vec + 32 * WARPS - 1) / (32 * WARPS) * 32;  // uint4 a warp, a multiple of 32
    const int warp_lo = warp * per_warp, warp_hi = min(n_vec, warp_lo + per_warp);
    unsigned counts = 0u;  // greater | equal << 16 over this lane's keys (a row < 2^16 keys: no carry)
    for (int v = warp_lo + lane; v < warp_hi; v += 32) {
        const uint4 key = keys4[v];
        const unsigned keys[4] = {key.x, key.y, key.z, key.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) counts += (keys[j] > threshold) + ((keys[j] == threshold && keys[j] != 0u) << 16);
    }
    counts = __reduce_add_sync(0xffffffffu, counts);  // the warp's
    if (lane == 0) warp_counts[warp] = counts;
    __syncthreads();
    unsigned before = 0u;  // over the earlier warps
    for (int w = 0; w < warp; ++w) before += warp_counts[w];
    unsigned greater = before & 0xFFFFu, equal = before >> 16;  // selected before this warp's range
    for (int v0 = warp_lo; v0 < warp_hi; v0 += 32) {  // warp-uniform steps, in increasing position
        const int v = v0 + lane;
        const uint4 key = v < warp_hi ? keys4[v] : make_uint4(0u, 0u, 0u, 0u);
        const unsigned keys[4] = {key.x, key.y, key.z, key.w};
        unsigned mine = 0u;
#pragma unroll
        for (int j = 0; j < 4; ++j) mine += (keys[j] > threshold) + ((keys[j] == threshold && keys[j] != 0u) << 16);
        unsigned inclusive = mine;  // prefix over the lanes of this step
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const unsigned other = __shfl_up_sync(0xffffffffu, inclusive, offset);
            if (lane >= offset) inclusive += other;
        }
        const unsigned step_total = __shfl_sync(0xffffffffu, inclusive, 31);
        unsigned g = greater + ((inclusive - mine) & 0xFFFFu), e = equal + ((inclusive - mine) >> 16);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            // output slot = selected elements before this one = greater + min(equal, r), as in kernel 1
            const int position = 4 * v + j - misalign;
            if (keys[j] > threshold) {
                const unsigned slot = g + min(e, r);
                if (slot < (unsigned)k) out_row[slot] = position;  // always true; a guard for the memory
                ++g;
            } else if (keys[j] == threshold && keys[j] != 0u) {
                if (e < r && g + e < (unsigned)k) out_row[g + e] = position;
                ++e;
            }
        }
        greater += step_total & 0xFFFFu;
        equal += step_total >> 16;
    }
    // -1 in the slots left over when the row has fewer than k candidates
    for (int i = (int)n_select + tid; i < k; i += NT) out_row[i] = -1;
}
