// Top-k selection by radix select, one block per row:   S_t = Top-k(I_t,:) over s < row_end[t]
//
// Checked against dsa_tutorial.topk.select_topk, bit for bit: the same set, the same order.
//
//   topk_radix_select   scores float32 [rows, S], row_end int32 [rows] (one past the last visible
//                       position of each row), out int32 [rows, k]: the selected positions in
//                       increasing order, then -1 in the slots a short row leaves over.
//
// The rules (module docstring of dsa_tutorial/topk.py):
//   * candidates are the positions s < row_end whose score is not NaN; -inf is an ordinary score;
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
// Four reads of the row and no sort; torch.topk sorts its candidates. The histograms live in
// shared memory (8 KiB) and are built with shared-memory atomics: a row of many equal scores makes
// those atomics collide (the answer stays right, only slower).

#define TOPK_THREADS 1024
#define RADIX_BINS 2048  // 11-bit digits: bits 31..21, 20..10, then a 10-bit digit 9..0
#define HIST_ITEMS 8     // scores in flight per thread in the histogram passes (memory parallelism)
#define ITEMS 4          // scores per thread per chunk in the ordered pass

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
__device__ __forceinline__ unsigned block_exclusive_scan(unsigned value, unsigned& total) {
    __shared__ unsigned warp_totals[TOPK_THREADS / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    unsigned inclusive = value;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        unsigned warp_sum = warp_totals[lane];  // TOPK_THREADS / 32 == 32 warps: one per lane
        for (int offset = 1; offset < 32; offset <<= 1) {
            const unsigned other = __shfl_up_sync(0xffffffffu, warp_sum, offset);
            if (lane >= offset) warp_sum += other;
        }
        warp_totals[lane] = warp_sum;  // inclusive sums of the warp totals
    }
    __syncthreads();
    total = warp_totals[TOPK_THREADS / 32 - 1];
    return inclusive - value + (warp > 0 ? warp_totals[warp - 1] : 0u);
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
topk_radix_select(const float* __restrict__ scores, const int* __restrict__ row_end, int* __restrict__ out,
                  int S, int k) {
    __shared__ unsigned hist[RADIX_BINS];
    __shared__ unsigned s_bin, s_above, s_candidates;
    const int tid = threadIdx.x;
    const float* row = scores + (size_t)blockIdx.x * S;
    int* out_row = out + (size_t)blockIdx.x * k;
    const int end = min(max(row_end[blockIdx.x], 0), S);  // positions [0, end) are visible

    // ---- passes 1-3: find the threshold key K and r, the number of keys == K to keep
    unsigned prefix = 0u, prefix_mask = 0u;  // the digits of K found so far, and where they are
    unsigned remaining = (unsigned)k;        // keys still to select at or below the current prefix
    bool take_all = false;                   // fewer than k candidates: select every one
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
        __syncthreads();
        // thread t holds buckets 2047-2t and 2046-2t: thread order is descending bucket order, so the
        // exclusive prefix sum of the per-thread counts is the number of keys in higher buckets
        const int hi_bin = RADIX_BINS - 1 - 2 * tid, lo_bin = hi_bin - 1;
        const unsigned c_hi = hist[hi_bin], c_lo = hist[lo_bin];
        unsigned total;
        const unsigned above = block_exclusive_scan(c_hi + c_lo, total);
        if (pass == 0 && tid == 0) s_candidates = total;
        // the bucket where the running count from the top reaches `remaining`
        if (above < remaining && remaining <= above + c_hi) {
            s_bin = (unsigned)hi_bin;
            s_above = above;
        } else if (above + c_hi < remaining && remaining <= above + c_hi + c_lo) {
            s_bin = (unsigned)lo_bin;
            s_above = above + c_hi;
        }
        __syncthreads();
        if (pass == 0 && s_candidates <= (unsigned)k) {  // block-uniform: every thread reads the same value
            take_all = true;
            break;
        }
        // K starts with this bucket's digit; the keys in higher buckets are all selected
        prefix |= s_bin << shift;
        prefix_mask |= digit_mask << shift;
        remaining -= s_above;
        __syncthreads();  // s_bin and s_above are rewritten by the next pass
    }
    // select key > K, and the first r keys == K; "take all" is K = 0, r = 0 (every key > 0)
    const unsigned threshold = take_all ? 0u : prefix;
    const unsigned r = take_all ? 0u : remaining;
    const unsigned n_select = take_all ? s_candidates : (unsigned)k;

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
