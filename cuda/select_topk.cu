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
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T value, T& total) {
    __shared__ T warp_totals[TOPK_THREADS / 32];
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
        T warp_sum = warp_totals[lane];  // TOPK_THREADS / 32 == 32 warps: one per lane
        for (int offset = 1; offset < 32; offset <<= 1) {
            const T other = __shfl_up_sync(0xffffffffu, warp_sum, offset);
            if (lane >= offset) warp_sum += other;
        }
        warp_totals[lane] = warp_sum;  // inclusive sums of the warp totals
    }
    __syncthreads();
    total = warp_totals[TOPK_THREADS / 32 - 1];
    return inclusive - value + (warp > 0 ? warp_totals[warp - 1] : T(0));
}

// The bucket of a RADIX_BINS histogram where the running count from the top bucket reaches
// `remaining` (1 <= remaining <= total; when remaining > total, `bin` is meaningless). Returns, the
// same in every thread: the bucket, `above` (keys in higher buckets), `in_bin` (keys in the bucket)
// and `total` (keys in all buckets). Barriers on entry (the histogram is complete) and on exit
// (everyone has read the results: the histogram and the scratch may be rewritten).
struct Bucket {
    unsigned bin, above, in_bin, total;
};
__device__ __forceinline__ Bucket find_bucket(const unsigned* hist, unsigned remaining) {
    __shared__ Bucket found;
    const int tid = threadIdx.x;
    __syncthreads();
    // thread t holds buckets 2047-2t and 2046-2t: thread order is descending bucket order, so the
    // exclusive prefix sum of the per-thread counts is the number of keys in higher buckets
    const int hi_bin = RADIX_BINS - 1 - 2 * tid, lo_bin = hi_bin - 1;
    const unsigned c_hi = hist[hi_bin], c_lo = hist[lo_bin];
    unsigned total;
    const unsigned above = block_exclusive_scan(c_hi + c_lo, total);
    if (tid == 0) found = Bucket{0u, 0u, 0u, total};
    __syncthreads();  // found.total is written before the thread that holds the bucket writes the rest
    if (above < remaining && remaining <= above + c_hi) {
        found = Bucket{(unsigned)hi_bin, above, c_hi, total};
    } else if (above + c_hi < remaining && remaining <= above + c_hi + c_lo) {
        found = Bucket{(unsigned)lo_bin, above + c_hi, c_lo, total};
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

// One past the last visible position of this block's row, clamped to [0, S]. Row r is query
// t = r % T of its batch; its last visible position is query_positions[t], or, when no positions
// are given (a null pointer), the causal alignment to the end of the keys: S - T + t. Any int64
// position is safe: it is clamped to [-1, S - 1] before the + 1 (no overflow at INT64_MAX).
__device__ __forceinline__ int visible_end(const long long* __restrict__ query_positions, int T, int S) {
    const int t = blockIdx.x % T;
    const long long last = query_positions ? query_positions[t] : (long long)S - T + t;
    return (int)(min(max(last, -1ll), (long long)S - 1) + 1);
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
select_topk_four_passes(const float* __restrict__ scores, const long long* __restrict__ query_positions, int T,
                        int* __restrict__ out, int S, int k) {
    __shared__ unsigned hist[RADIX_BINS];
    const int end = visible_end(query_positions, T, S);  // positions [0, end) are visible
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

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
select_topk_compact(const float* __restrict__ scores, const long long* __restrict__ query_positions, int T,
                    int* __restrict__ out, int S, int k, int list_capacity) {
    extern __shared__ __align__(16) unsigned topk_list[];  // dynamic: keys [list_capacity], positions [list_capacity]
    __shared__ unsigned hist[RADIX_BINS];
    unsigned* list_key = topk_list;
    int* list_pos = reinterpret_cast<int*>(topk_list + list_capacity);
    const int tid = threadIdx.x;
    const float* row = scores + (size_t)blockIdx.x * S;
    int* out_row = out + (size_t)blockIdx.x * k;
    const int end = visible_end(query_positions, T, S);  // positions [0, end) are visible
    // [0, head) scalars, [head, tail) float4s (n4 of them), [tail, end) scalars
    const int head = min(end, (int)((4u - (unsigned)(reinterpret_cast<size_t>(row) / 4u)) % 4u));
    const int n4 = (end - head) / 4, tail = head + 4 * n4;
    const float4* body = reinterpret_cast<const float4*>(row + head);

    // ---- read 1 (pass 1): histogram of bits 31..21 of every candidate key
    for (int i = tid; i < RADIX_BINS; i += TOPK_THREADS) hist[i] = 0u;
    __syncthreads();
    if (tid < head) {
        const unsigned key = order_key(row[tid]);
        if (key != 0u) atomicAdd(&hist[key >> 21], 1u);
    }
    if (tail + tid < end) {
        const unsigned key = order_key(row[tail + tid]);
        if (key != 0u) atomicAdd(&hist[key >> 21], 1u);
    }
    for (int base = 0; base < n4; base += LOADS * TOPK_THREADS) {
        unsigned key[LOADS][4];
#pragma unroll
        for (int i = 0; i < LOADS; ++i) load_keys4(body, base + i * TOPK_THREADS + tid, n4, key[i]);  // all loads first
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
    if (list_len > (unsigned)list_capacity) {  // block-uniform: a long run of ties at the threshold
        select_four_passes(row, end, out_row, k, hist);
        return;
    }

    // ---- read 2: the list, in increasing position: every key in bucket low_bin or above
    // head and tail (at most 3 scores each): every thread computes the same count, thread 0 writes
    unsigned filled = 0u;  // entries written so far (block-uniform)
    for (int s = 0; s < head; ++s) {
        const unsigned key = order_key(row[s]);
        if (in_list(key, low_bin)) {
            if (tid == 0 && filled < list_len) {
                list_key[filled] = key;
                list_pos[filled] = s;
            }
            ++filled;
        }
    }
    for (int base = 0; base < n4; base += LOADS * TOPK_THREADS) {
        unsigned key[LOADS][4];
        unsigned long long counts = 0ull;  // list entries of load i in bits 16 i .. 16 i + 15 (each <= 4096)
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            load_keys4(body, base + i * TOPK_THREADS + tid, n4, key[i]);
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
            const int first = head + 4 * (base + i * TOPK_THREADS + tid);  // position of key[i][0]
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (in_list(key[i][j], low_bin)) {
                    if (slot < list_len) {  // always true; a guard against writing past the list
                        list_key[slot] = key[i][j];
                        list_pos[slot] = first + j;
                    }
                    ++slot;
                }
            filled += (unsigned)(totals >> (16 * i)) & 0xFFFFu;
        }
    }
    for (int s = tail; s < end; ++s) {
        const unsigned key = order_key(row[s]);
        if (in_list(key, low_bin)) {
            if (tid == 0 && filled < list_len) {
                list_key[filled] = key;
                list_pos[filled] = s;
            }
            ++filled;
        }
    }
    __syncthreads();  // the list is complete (filled == list_len)

    // ---- passes 2-3 on the list: the threshold key K and r, as in kernel 1
    unsigned prefix = b1.bin << 21, prefix_mask = 0x7FFu << 21;
    unsigned remaining = (unsigned)k - b1.above;
    if (!take_all) {
        for (int pass = 1; pass < 3; ++pass) {
            const int shift = pass == 1 ? 10 : 0;
            const unsigned digit_mask = pass == 1 ? 0x7FFu : 0x3FFu;
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
