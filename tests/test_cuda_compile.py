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
import re
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


# The wgmma kernels whose shared memory base is aligned to 1024 bytes at run time (align_smem of
# cuda/wgmma.cuh): every access through the aligned pointers must stay in the shared window.
SHARED_WINDOW_KERNELS = {
    "sparse_mla_decode_fp8": ("sparse_mla_decode_fp8_wgmma", "sparse_mla_decode_fp8_ws"),
    "sparse_mla_prefill": ("sparse_mla_prefill_wgmma",),
    "mqa_logits": ("mqa_logits_tma_h64_f32", "mqa_logits_tma_h64_bf16", "mqa_logits_tma_h32_f32",
                   "mqa_logits_tma_h32_bf16"),
}
_STATE_SPACES = ("global", "shared", "param", "local", "const")


def _ptx_entry(ptx: str, entry: str) -> str:
    """The PTX of one kernel: from its .entry to the next one (or the end)."""
    start = ptx.index(f".entry {entry}(")
    following = ptx.find(".entry ", start + 1)
    return ptx[start:following if following > 0 else len(ptx)]


def _generic_loads_and_stores(body: str) -> list[str]:
    """The ld/st instructions of a PTX body that name no state space: generic addressing."""
    ops = re.findall(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st)\.[\w.:]+)", body, re.M)
    assert ops, "no ld/st found: the PTX parse is broken"
    return [op for op in ops if not any(part.split("::")[0] in _STATE_SPACES for part in op.split(".")[1:])]


@pytest.mark.parametrize("name", sorted(SHARED_WINDOW_KERNELS))
def test_wgmma_kernels_address_shared_memory_through_the_shared_window(name):
    """A pointer rebuilt from an integer (the 1024-aligned base computed through size_t) loses its state
    space, and every access through it becomes a generic ld/st (LD.E/ST.E in SASS); align_smem keeps it a
    shared-memory pointer. The PTX shows which the compiler chose."""
    ptx = kernels.compile_ptx(name)
    for entry in SHARED_WINDOW_KERNELS[name]:
        generic = _generic_loads_and_stores(_ptx_entry(ptx, entry))
        assert not generic, f"{entry} addresses memory generically: {sorted(set(generic))}"


def test_the_generic_access_check_sees_one():
    body = """
        ld.shared.v4.u32 {%r1, %r2, %r3, %r4}, [%r5];
        @%p1 st.global.v2.f32 [%rd1], {%f1, %f2};
        ld.volatile.shared.v4.u32 {%r1, %r2, %r3, %r4}, [%r6];
        st.shared::cluster.b32 [%r7], %r8;
        ld.param.u64 %rd2, [k_param_0];
        st.v4.u32 [%rd3], {%r1, %r2, %r3, %r4};
        @!%p2 ld.u16 %rs1, [%rd4];
    """
    assert _generic_loads_and_stores(body) == ["st.v4.u32", "ld.u16"]
