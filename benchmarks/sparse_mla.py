"""Benchmark the sparse MLA attention decode kernels (cuda/sparse_mla_attention.cu) against torch on an H200.

    python benchmarks/sparse_mla.py     (from the repository root, on a GPU; under a minute)

Decode, one new token per sequence: batch 64, 128 heads, k = 2048 selected of S = 32768 cached
tokens (bf16 latent cache [B, S, 576]). Timed:
* the public call `sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, softmax_scale)` with its
  default arguments (kernel=None: kernel 2; data checks off, the default: the indices are not read
  back), as a user calls it, with its one kernel launch replayed alone beside it (bench.time_call);
* every version of SPARSE_MLA_ATTENTION_KERNELS through the same call: kernel 1 (float32 CUDA
  cores) and kernel 2 (bf16 tensor cores), each first checked once against the float32 reference;
* baselines: dense masked torch attention (bf16 bmm over the whole cache, -inf outside the
  selection, float32 softmax, bf16 bmm with c_kv: what "dense attention with -inf outside the set"
  costs) and gathered torch attention (gather the 2048 selected latents, then the same over them).
FLOPs are those of the sparse work, 2 B n_h k (576 + 512), quoted against the bf16 ceiling; bytes
are the selected latents read once plus q and the float32 output, against the copy bandwidth.
Speed-ups are against the gathered baseline (the dense one is printed for scale). Both baselines are
in dsa_tutorial.baselines; every line is also written to book/data/kernels/sparse_mla_attention.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import baselines, bench, checks, compare  # noqa: E402
from dsa_tutorial.config import ModelArgs  # noqa: E402
from dsa_tutorial.sparse_attention import (SPARSE_MLA_ATTENTION_KERNELS, sparse_mla_attention,  # noqa: E402
                                           sparse_mla_attention_cuda)

B, N_H, K, S = 64, 128, 2048, 32768
SCALE = ModelArgs().softmax_scale


def make_selection():
    """kv [B, S, 576] and a distinct, sorted selection of K positions per sequence."""
    kv = torch.randn(B, S, 576, device="cuda").to(torch.bfloat16)
    indices = torch.rand(B, S, device="cuda").argsort(dim=-1)[:, :K].sort(dim=-1).values.int().contiguous()
    return kv, indices


def make_kernel_inputs():
    """What the public call takes: q_abs [B, n_h, 512], q_rope [B, n_h, 64], kv, indices."""
    kv, indices = make_selection()
    q_abs = torch.randn(B, N_H, 512, device="cuda").to(torch.bfloat16)
    q_rope = torch.randn(B, N_H, 64, device="cuda").to(torch.bfloat16)
    return q_abs, q_rope, kv, indices


def make_torch_inputs():
    """What the torch baselines take: q [B, n_h, 576], kv, indices and the dense baseline's mask."""
    kv, indices = make_selection()
    q = torch.randn(B, N_H, 576, device="cuda").to(torch.bfloat16)
    mask = torch.full((B, 1, S), float("-inf"), device="cuda").scatter_(-1, indices[:, None].long(), 0.0)
    return q, kv, indices, mask


def public_call(q_abs, q_rope, kv, indices):
    return sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, SCALE)


def check_once() -> None:
    """Every version against the float32 reference on 4 full-size sequences (a sanity check)."""
    q_abs, q_rope, kv, indices = (x[:4].contiguous() for x in make_kernel_inputs())
    ref = sparse_mla_attention(q_abs.float()[:, None], q_rope.float()[:, None], kv.float()[..., :512],
                               kv.float()[..., 512:], indices[:, None], SCALE)[:, 0]
    tolerances = {1: dict(atol=1e-4, rtol=1e-4), 2: dict(atol=1e-2 * ref.abs().max().item(), rtol=1e-2)}
    for v in SPARSE_MLA_ATTENTION_KERNELS.versions:
        out = sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, SCALE, kernel=v)
        result = compare.assert_close(out, ref, **tolerances[v], name=f"sparse_mla_attention kernel {v}")
        print(f"kernel {v} vs float32 reference: {result} {result.measured()}")


def dense_masked(q, kv, indices, mask):
    return baselines.sparse_attention_dense_torch(q, kv, mask, SCALE)


def gathered(q, kv, indices, mask):
    return baselines.sparse_attention_gathered_torch(q, kv, indices, SCALE)


def main() -> None:
    torch.manual_seed(0)
    checks.set_data_checks(False)  # what a user gets by default, whatever DSA_CHECK says: no indices read back
    check_once()
    ceilings = bench.measure_ceilings()
    print(ceilings)
    results = bench.Results("sparse_mla_attention", ceilings)
    rates = dict(flops=2 * B * N_H * K * (576 + 512), ceiling="bf16",
                 nbytes=B * K * 576 * 2 + B * N_H * 576 * 2 + B * N_H * 512 * 4)
    case = f"B={B} n_h={N_H} k={K} S={S}"
    dense = bench.benchmark(dense_masked, make_torch_inputs, warmup=2, reps=10)
    gather = bench.benchmark(gathered, make_torch_inputs, warmup=2, reps=10)
    timed = bench.time_call(public_call, make_kernel_inputs, warmup=2, reps=30)
    print(results.add(case, "baseline", dense, label="torch dense masked", **rates))
    print(results.add(case, "baseline", gather, label="torch gathered", baseline=dense, **rates))
    print(results.add(case, "default", timed, baseline=gather, **rates))
    for v in SPARSE_MLA_ATTENTION_KERNELS.versions:
        timing = bench.benchmark(lambda q_abs, q_rope, kv, indices, v=v:
                                 sparse_mla_attention_cuda(q_abs, q_rope, kv, indices, SCALE, kernel=v),
                                 make_kernel_inputs, warmup=2, reps=10)
        print(results.add(case, "kernel", timing, version=v, baseline=gather, **rates))
    print("wrote", results.write())

if __name__ == "__main__":
    main()
