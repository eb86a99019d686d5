"""Every cuda/*.cu compiles for kernels.DEFAULT_ARCH (sm_90a, the H200) with the loader's own options:
the only check CUDA sources get where there is no GPU. `python3 dev.py compile-check` prints
registers and spills per kernel. The FP8 logits files also compile for other targets, where their
sm_90a-only `wgmma` kernels are guarded down to a trap.

The sources are compiled in a fresh process with the loader's disk cache off. On the H200 machines
NVRTC itself caches compiled programs, across processes, and returns a repeat compile with an empty
log (no ptxas report), so which kernels a source defines is read from the cubin
(CompiledSource.entry_points); registers and spills are checked wherever ptxas reports them, and
must be reported where there is no GPU (CI)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dsa_tutorial import kernels

SOURCES = kernels.kernel_names()
# the kernel 4 entry points (wgmma, sm_90a only) that dsa_tutorial.fp8 and dsa_tutorial.paged launch
WGMMA_KERNELS = {
    "fp8_mqa_logits": {f"fp8_mqa_logits_wgmma_h{H}" for H in (64, 32)},
    "fp8_paged_mqa_logits": {f"fp8_paged_mqa_logits_wgmma_h{H}_n{n}" for H in (64, 32) for n in (1, 2)},
}
# plain Hopper and Ada; not sm_80: the FP8 files need sm_89 whatever the guards (e4m3 cvt and mma.sync)
OTHER_ARCHS = ("sm_90", "sm_89")

# argv: the architecture, then the source names (none: every cuda/*.cu)
_COMPILE = """
import json, sys
from dsa_tutorial import kernels
arch, names = sys.argv[1], sys.argv[2:] or kernels.kernel_names()
result = {}
for name in names:
    try:
        compiled = kernels.compile_source(name, arch, use_cache=False)
        result[name] = {"usage": compiled.resource_usage(), "entries": compiled.entry_points(),
                        "log": compiled.log, "error": None}
    except kernels.KernelCompileError as exc:
        result[name] = {"usage": {}, "entries": [], "log": "", "error": str(exc)}
json.dump(result, sys.stdout)
"""


def _compile_in_subprocess(arch: str, *names: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _COMPILE, arch, *names], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def compiled():
    return _compile_in_subprocess(kernels.DEFAULT_ARCH)


@pytest.fixture(scope="module")
def compiled_elsewhere():
    return {arch: _compile_in_subprocess(arch, *WGMMA_KERNELS) for arch in OTHER_ARCHS}


@pytest.mark.parametrize("name", SOURCES)
def test_compiles_for_the_default_arch(compiled, name):
    result = compiled[name]
    assert result["error"] is None, result["error"]
    entries, usage = set(result["entries"]), result["usage"]
    assert entries, f"cuda/{name}.cu defines no kernel (is it extern \"C\" __global__?)"
    assert "warning" not in result["log"].lower(), f"cuda/{name}.cu compiles with warnings:\n{result['log']}"
    if usage or not torch.cuda.is_available():  # ptxas's report: always without a GPU, not always on the H200
        assert set(usage) == entries, f"ptxas reported {sorted(usage)}, the cubin defines {sorted(entries)}"
    heavy = {k: u for k, u in usage.items() if u["spill_stores"] > 256 or u["stack"] > 4096}
    assert not heavy, f"cuda/{name}.cu spills heavily: {heavy}"
    missing = WGMMA_KERNELS.get(name, set()) - entries
    assert not missing, f"cuda/{name}.cu lacks the wgmma kernels the package launches: {sorted(missing)}"


def test_compile_reports_registers_per_kernel(compiled):
    usage = compiled["rms_norm"]["usage"]
    if not usage and torch.cuda.is_available():
        pytest.skip("NVRTC returned a cached program without ptxas's report (module docstring); CI checks it")
    assert set(usage) == {"rms_norm_f32", "rms_norm_bf16", "rms_norm_bf16_vec"}
    assert all(u["registers"] > 0 and u["spill_stores"] == 0 for u in usage.values())


@pytest.mark.parametrize("arch", OTHER_ARCHS)
@pytest.mark.parametrize("name", sorted(WGMMA_KERNELS))
def test_wgmma_sources_compile_for_other_archs(compiled_elsewhere, name, arch):
    # the wgmma bodies are guarded (__CUDA_ARCH_FEAT_SM90_ALL): for a target without wgmma the file still
    # compiles, with every entry point present (a trap), so one loader serves every GPU
    result = compiled_elsewhere[arch][name]
    assert result["error"] is None, f"cuda/{name}.cu does not compile for {arch}:\n{result['error']}"
    assert "warning" not in result["log"].lower(), f"cuda/{name}.cu compiles with warnings for {arch}:\n{result['log']}"
    missing = WGMMA_KERNELS[name] - set(result["entries"])
    assert not missing, f"cuda/{name}.cu for {arch} lacks the entry points {sorted(missing)}"


@pytest.mark.parametrize("capability, arch", [((9, 0), "sm_90a"), ((8, 0), "sm_80"), ((8, 9), "sm_89"),
                                              ((10, 0), "sm_100"), ((12, 0), "sm_120")])
def test_arch_for_capability(capability, arch):
    # sm_90a (wgmma) only on 9.0 exactly: its cubins run nowhere else
    assert kernels.arch_for_capability(*capability) == arch
    kernels.compile_options(arch)  # a target the loader accepts


def test_default_arch_is_the_h200s():
    assert kernels.DEFAULT_ARCH == kernels.arch_for_capability(9, 0) == "sm_90a"


def test_wgmma_is_refused_off_the_gpu():
    assert not kernels.wgmma_available("cpu") and not kernels.wgmma_available(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"compute capability 9\.0.*use kernel='tensor_core_f16'"):
        kernels.require_wgmma("cpu", instead="tensor_core_f16")
