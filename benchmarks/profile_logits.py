"""What limits the indexer's kernels where they miss their targets: one public call (default arguments)
of each case below, and DeepGEMM's call on the same inputs when deep_gemm is importable, for Nsight
Compute to read the hardware counters of:

    ncu --kernel-name regex:"mqa_logits|select_topk" --section SpeedOfLight --section WarpStateStats \\
        --section ComputeWorkloadAnalysis --section SchedulerStats --section Occupancy \\
        python benchmarks/profile_logits.py

(from the repository root, on a GPU; DeepGEMM as in deepgemm_side_by_side.py). The cases: mqa_logits
4096 x 65536 causal; paged_mqa_logits B 128, contexts ~32K, next_n 2, and B 64, ~8K, next_n 1;
select_topk_cuda on 128 x 131072 scores, k 2048. The paged cases run the default, then every kernel from
4 up (wgmma, TMA). It launches and prints nothing else.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import mqa_inputs, paged_inputs  # noqa: E402  (benchmarks/cases.py)
from dsa_tutorial import checks, fp8, paged, topk  # noqa: E402

try:
    import deep_gemm
except ImportError:
    deep_gemm = None

checks.set_data_checks(False)  # the default a user gets

q, kv, weights, ks, ke = mqa_inputs(4096, 65536)
fp8.mqa_logits_cuda(q, kv, weights, ks, ke)
if deep_gemm is not None:
    deep_gemm.fp8_mqa_logits(q, kv, weights, ks, ke, True, 0)
del q, kv, weights, ks, ke

for B, context, next_n in ((128, 32768, 2), (64, 8192, 1)):
    q, kv_cache, w, lens, block_table, schedule, max_context_len = paged_inputs(B, context, next_n)
    for kernel in (None, *(v for v in paged.PAGED_MQA_LOGITS_KERNELS.versions if v >= 4)):  # default, 4, 5
        paged.paged_mqa_logits_cuda(q, kv_cache, w, lens, block_table, schedule, max_context_len, kernel=kernel)
    if deep_gemm is not None:
        rows = paged.row_lengths(lens, next_n).contiguous()
        their_schedule = deep_gemm.get_paged_mqa_logits_metadata(rows, 64, deep_gemm.get_num_sms())
        deep_gemm.fp8_paged_mqa_logits(q, kv_cache, w, rows, block_table, their_schedule, max_context_len, False)

scores = torch.randn(128, 131072, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
topk.select_topk_cuda(scores, 2048)
torch.cuda.synchronize()
