"""Launch the foundation's kernels once at small ragged sizes, for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_foundation.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_foundation.py
"""
import torch

from dsa_tutorial import compare, norm


def main() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for n_rows, dim in [(3, 1), (5, 129), (2, 7168), (3, 8200), (4, 8)]:
            x = torch.randn(n_rows, dim, device="cuda").to(dtype)
            g = torch.randn(dim, device="cuda").to(dtype)
            out = compare.poisoned((n_rows, dim), dtype, "cuda")
            norm.rms_norm_cuda(x, g, out=out)
            compare.assert_close(out, norm.rms_norm(x.double(), g.double()), atol=2e-2, rtol=8e-3)
    torch.cuda.synchronize()
    print("sanitize_foundation: all launches checked")


if __name__ == "__main__":
    main()
