"""What limits sparse FP8 decode: one launch each of kernels 3 and 4 at FlashMLA's compute-bound shape
(B = 128, h = 128, s_q = 2, k = 2048), for Nsight Compute to read the hardware counters of:

    ncu --kernel-name regex:sparse_mla_decode_fp8_ --section SpeedOfLight --section WarpStateStats \\
        --section ComputeWorkloadAnalysis python benchmarks/profile_decode_fp8.py

(from the repository root, on a GPU). It launches and prints nothing else.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import latent_cache  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402

B, S_Q, H, K, BLOCK = 128, 2, 128, 2048, 64
g = torch.Generator(device="cuda").manual_seed(0)
num_blocks = B * 32768 // BLOCK
cache = latent_cache.quantize(torch.randn(num_blocks, BLOCK, 1, 576, device="cuda", generator=g).bfloat16())
indices = torch.randint(0, num_blocks * BLOCK, (B, S_Q, K), device="cuda", generator=g, dtype=torch.int32)
q = torch.randn(B, S_Q, H, 576, device="cuda", generator=g).bfloat16()
for kernel in (3, 4):
    latent_cache.sparse_mla_decode_fp8_cuda(q, cache, indices, ModelArgs().softmax_scale, kernel=kernel)
torch.cuda.synchronize()
