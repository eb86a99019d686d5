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

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest
import torch

import dsa_tutorial
from dsa_tutorial import kernels

SOURCES = kernels.kernel_names()


def _tables() -> dict[str, kernels.KernelTable]:
    """Every KernelTable of the package, by its .cu file (found by importing each module)."""
    found: dict[str, list] = {}
    for module in pkgutil.iter_modules(dsa_tutorial.__path__):
        for value in vars(importlib.import_module(f"dsa_tutorial.{module.name}")).values():
            if isinstance(value, kernels.KernelTable) and all(value is not t for t in found.get(value.source, [])):
                found.setdefault(value.source, []).append(value)
    several = {source: len(tables) for source, tables in found.items() if len(tables) > 1}
    assert not several, f"one kernel table per .cu file, but found several for {several}"
    return {source: tables[0] for source, tables in found.items()}


TABLES = _tables()
# the files whose newest kernels are wgmma (sm_90a only): every other target must still build them
WGMMA_SOURCES = ("mqa_logits", "paged_mqa_logits")
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
    return {arch: _compile_in_subprocess(arch, *WGMMA_SOURCES) for arch in OTHER_ARCHS}


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
    assert name in TABLES, f"cuda/{name}.cu has no kernel table in the package (kernels.KernelTable)"
    missing = set(TABLES[name].entry_points()) - entries
    assert not missing, f"cuda/{name}.cu lacks entry points its kernel table names: {sorted(missing)}"


def test_every_table_has_a_source():
    assert set(TABLES) <= set(SOURCES), f"tables without a .cu file: {sorted(set(TABLES) - set(SOURCES))}"


def test_compile_reports_registers_per_kernel(compiled):
    usage = compiled["rms_norm"]["usage"]
    if not usage and torch.cuda.is_available():
        pytest.skip("NVRTC returned a cached program without ptxas's report (module docstring); CI checks it")
    assert set(usage) == {"rms_norm_f32", "rms_norm_bf16", "rms_norm_bf16_vec"}
    assert all(u["registers"] > 0 and u["spill_stores"] == 0 for u in usage.values())


@pytest.mark.parametrize("arch", OTHER_ARCHS)
@pytest.mark.parametrize("name", WGMMA_SOURCES)
def test_wgmma_sources_compile_for_other_archs(compiled_elsewhere, name, arch):
    # the wgmma bodies are guarded (__CUDA_ARCH_FEAT_SM90_ALL): for a target without wgmma the file still
    # compiles, with every entry point present (a trap), so one loader serves every GPU
    result = compiled_elsewhere[arch][name]
    assert result["error"] is None, f"cuda/{name}.cu does not compile for {arch}:\n{result['error']}"
    assert "warning" not in result["log"].lower(), f"cuda/{name}.cu compiles with warnings for {arch}:\n{result['log']}"
    missing = set(TABLES[name].entry_points()) - set(result["entries"])
    assert not missing, f"cuda/{name}.cu for {arch} lacks the entry points {sorted(missing)}"


@pytest.mark.parametrize("capability, arch", [((9, 0), "sm_90a"), ((8, 0), "sm_80"), ((8, 9), "sm_89"),
                                              ((10, 0), "sm_100"), ((12, 0), "sm_120")])
def test_arch_for_capability(capability, arch):
    # sm_90a (wgmma) only on 9.0 exactly: its cubins run nowhere else
    assert kernels.arch_for_capability(*capability) == arch
    kernels.compile_options(arch)  # a target the loader accepts


def test_default_arch_is_the_h200s():
    assert kernels.DEFAULT_ARCH == kernels.arch_for_capability(9, 0) == "sm_90a"


def test_wgmma_is_not_available_off_the_gpu():
    assert not kernels.wgmma_available("cpu") and not kernels.wgmma_available(torch.device("cpu"))
