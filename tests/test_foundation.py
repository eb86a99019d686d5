"""The loader, the input checks, the comparison helper and the RMSNorm path, on the CPU."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dsa_tutorial import checks, compare, cost, kernels, norm
from dsa_tutorial.config import ModelArgs


def test_import_is_silent_and_lazy():
    """Importing every module of the package computes, compiles and prints nothing (no CuPy, no
    NVRTC, no GPU work, no output)."""
    code = ("import importlib, pkgutil, sys, dsa_tutorial\n"
            "names = [m.name for m in pkgutil.walk_packages(dsa_tutorial.__path__, 'dsa_tutorial.')\n"
            "         if not m.name.endswith('__main__')]\n"
            "for name in names: importlib.import_module(name)\n"
            "assert 'cupy' not in sys.modules, 'importing the package imported CuPy'\n"
            "assert len(names) >= 8, names\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", (result.stdout, result.stderr)


def test_missing_source_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="rms_norm"):
        kernels.source_path("no_such_kernel")
    with pytest.raises(ValueError, match="letters, digits"):
        kernels.source_path("../etc/passwd")


def test_compile_error_carries_the_nvrtc_log_with_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* y) {\n  y[0] = undefined_name;\n}\n')
    monkeypatch.setenv("DSA_CUDA_DIR", str(tmp_path))
    with pytest.raises(kernels.KernelCompileError, match=r"cuda/broken\.cu\(2\).*undefined_name"):
        kernels.compile_source("broken", use_cache=False)


def test_compile_options_live_in_one_place():
    options = kernels.compile_options("sm_90")
    assert "--gpu-architecture=sm_90" in options and "-lineinfo" in options
    with pytest.raises(ValueError, match="sm_90"):
        kernels.compile_options("hopper")


@pytest.mark.skipif(kernels.gpu_available(), reason="checks the CPU-only error path")
def test_no_gpu_gives_one_clear_error():
    with pytest.raises(kernels.GPUUnavailableError, match="pip install.*gpu.*Skip the cells tagged `gpu`"):
        kernels.load("rms_norm")
    with pytest.raises(kernels.GPUUnavailableError, match="cupy-cuda13x"):
        kernels.launch("rms_norm", "rms_norm_f32", 1, 256, ())


def test_check_tensor_messages():
    dims = {}
    checks.check_tensor(torch.zeros(3, 4, 8), "q_idx", shape=("T", "H", "D"), dims=dims)
    with pytest.raises(ValueError, match="k_idx has D = 16 .* but D = 8 elsewhere"):
        checks.check_tensor(torch.zeros(5, 16), "k_idx", shape=("S", "D"), dims=dims)
    with pytest.raises(ValueError, match="must have 2 dims"):
        checks.check_tensor(torch.zeros(5), "k_idx", shape=("S", "D"))
    with pytest.raises(TypeError, match="must be bfloat16 or float32, got int64"):
        checks.check_tensor(torch.zeros(2, dtype=torch.int64), "w", dtype=(torch.bfloat16, torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        checks.check_tensor(torch.zeros(4, 4).t(), "x", contiguous=True)
    with pytest.raises(ValueError, match="CUDA device"):
        checks.check_tensor(torch.zeros(2), "x", cuda=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        checks.check_tensor([1, 2], "x")
    with pytest.raises(ValueError, match="k must be <= 7, got 9"):
        checks.check_range(9, "k", 1, 7)
    with pytest.raises(ValueError, match="a on cpu, b on meta"):
        checks.check_same_device(a=torch.zeros(1), b=torch.zeros(1, device="meta"))


def test_calc_diff_is_deepgemm_metric():
    x = torch.randn(1000, dtype=torch.float64)
    assert compare.calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert compare.calc_diff(x, -x) == pytest.approx(2.0)
    noise = 1e-3 * torch.randn(1000, dtype=torch.float64)
    # for y = x + e with small e: calc_diff ~ sum(e^2) / (2 sum(x^2))
    assert compare.calc_diff(x, x + noise) == pytest.approx(float((noise**2).sum() / (2 * (x**2).sum())), rel=0.05)


def test_compare_catches_nan_inf_pattern_and_tolerance():
    ref = torch.randn(8, 8)
    ref[0, 3] = float("-inf")
    ok = ref.clone()
    ok[1, 1] += 1e-6
    assert compare.compare(ok, ref, atol=1e-5).passed
    unwritten = ok.clone()
    unwritten[2, 2] = float("nan")
    result = compare.compare(unwritten, ref, atol=1e-5)
    assert not result.passed and result.nan_count == 1
    wrong_mask = ok.clone()
    wrong_mask[0, 3] = 0.0
    assert not compare.compare(wrong_mask, ref, atol=1e-5).inf_pattern_ok
    off = ok.clone()
    off[4, 4] += 1e-2
    with pytest.raises(AssertionError, match=r"at \[4, 4\]"):
        compare.assert_close(off, ref, atol=1e-5)
    assert str(compare.compare(ok, ref, atol=1e-5)) == "PASS (atol 1e-05, rtol 0)"
    assert "calc_diff" in compare.compare(ok, ref, atol=1e-5).measured()


def test_poisoned_buffers_are_never_valid_outputs():
    assert torch.isnan(compare.poisoned((3,), torch.float32, "cpu")).all()
    assert torch.isnan(compare.poisoned((3,), torch.float8_e4m3fn, "cpu").float()).all()
    assert (compare.poisoned((3,), torch.int32, "cpu") == torch.iinfo(torch.int32).min).all()


def test_rms_norm_reference():
    x = torch.randn(5, 37, dtype=torch.float64)
    w = torch.randn(37, dtype=torch.float64)
    y = norm.rms_norm(x, w, 1e-6)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    compare.assert_close(y, expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="weight must have shape"):
        norm.rms_norm(x, torch.ones(36, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps must be positive"):
        norm.rms_norm(x, w, 0.0)


def test_cache_bytes_match_the_spec():
    table = cost.cache_bytes_per_token(ModelArgs())
    assert list(table.values()) == [81920, 1152, 656, 132]
    assert cost.causal_pairs(4) == 10 and cost.causal_pairs(4, topk=2) == 3 + 2 * 2
    assert ModelArgs().latent_dim == 576


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows,dim", [(1, 1), (7, 129), (333, 512), (5, 8), (3, 8200), (130, 7168), (2, 8192)])
def test_rms_norm_cuda_matches_reference(dtype, n_rows, dim):
    x = torch.randn(n_rows, dim, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(dim, device="cuda")).to(dtype)
    ref = norm.rms_norm(x.double(), w.double(), 1e-6)
    # float32: sum-of-squares reordering, ~1e-6 relative; bf16: the output's own rounding (2^-8)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=8e-3)
    for _ in range(2):  # twice: a race shows as results that move between runs
        out = compare.poisoned(x.shape, dtype, "cuda")
        norm.rms_norm_cuda(x, w, 1e-6, out=out)
        compare.assert_close(out, ref, **tol, name=f"rms_norm_cuda {dtype}")


@pytest.mark.gpu
def test_rms_norm_cuda_rejects_bad_input():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        norm.rms_norm_cuda(x.t(), torch.ones(4, device="cuda"))
    with pytest.raises(ValueError, match="CUDA device"):
        norm.rms_norm_cuda(x.cpu(), torch.ones(8))
    with pytest.raises(TypeError, match="weight must be float32"):
        norm.rms_norm_cuda(x, torch.ones(8, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dim = 9"):
        norm.rms_norm_cuda(x, torch.ones(9, device="cuda"))


@pytest.mark.gpu
def test_launch_rejects_non_contiguous_and_foreign_tensors():
    x = torch.randn(4, 8, device="cuda")
    y = torch.empty(4, 8, device="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        kernels.launch("rms_norm", "rms_norm_f32", 4, 256, (x.t(), torch.ones(8, device="cuda"), y, 4, 8, 1e-6))
    with pytest.raises(ValueError, match="CUDA tensor"):
        kernels.launch("rms_norm", "rms_norm_f32", 4, 256, (x.cpu(), torch.ones(8, device="cuda"), y, 4, 8, 1e-6))
    with pytest.raises(ValueError, match="int32"):
        kernels.launch("rms_norm", "rms_norm_f32", 4, 256, (x, torch.ones(8, device="cuda"), y, 2**40, 8, 1e-6))


@pytest.mark.gpu
def test_timer_and_ceilings_are_sane():
    from dsa_tutorial import bench

    n = 1 << 20  # 8 MiB a set: the timer must rotate through several to exceed 2x L2
    t = bench.benchmark(lambda a, b: b.copy_(a), lambda: (torch.rand(n, device="cuda"), torch.empty(n, device="cuda")),
                        reps=10)
    assert 0 < t.p20_us <= t.median_us <= t.p80_us and t.input_sets >= 2
    ceilings = bench.measure_ceilings(gemm_size=4096, copy_bytes=1 << 28)
    assert 0.5 < ceilings.copy_tbps < 10 and 50 < ceilings.bf16_tflops < 2000 and 50 < ceilings.fp8_tflops < 4000
