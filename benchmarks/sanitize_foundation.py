"""Launch every kernel of cuda/rms_norm.cu (every version of RMS_NORM_KERNELS) at small ragged sizes,
for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_foundation.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_foundation.py

RMSNorm reads no index or position: only its sizes decide what it touches, so there are no wild
values to try; the sizes are ragged (rows not a multiple of the block's stride, kernel 2's largest row).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsa_tutorial import compare, norm  # noqa: E402


def main() -> None:
    table = norm.RMS_NORM_KERNELS
    most = table.defines()["RMS_THREADS"] * 8 * table.defines()["RMS_VECS"]  # kernel 2's longest row
    for kernel in table.versions:
        for dtype in (torch.float32, torch.bfloat16) if kernel == 1 else (torch.bfloat16,):  # kernel 2: bf16
            for n_rows, dim in [(3, 1), (5, 129), (2, 7168), (3, 8200), (4, 8), (2, most)]:
                if kernel == 2 and (dim % 8 or dim > most):
                    continue  # kernel 2: rows of a multiple of 8 values, up to `most`
                x = torch.randn(n_rows, dim, device="cuda").to(dtype)
                g = torch.randn(dim, device="cuda").to(dtype)
                out = compare.poisoned((n_rows, dim), dtype, "cuda")
                norm.rms_norm_cuda(x, g, out=out, kernel=kernel)
                compare.assert_close(out, norm.rms_norm(x.double(), g.double()), atol=2e-2, rtol=8e-3,
                                     name=f"rms_norm kernel {kernel} {dtype} [{n_rows}, {dim}]")
            print(f"rms_norm kernel {kernel} {dtype}: OK")
    torch.cuda.synchronize()
    print("sanitize_foundation: all launches checked")


if __name__ == "__main__":
    main()
