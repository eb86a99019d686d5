"""Every cuda/*.cu compiles for sm_90 with the loader's own options: the only check CUDA sources
get where there is no GPU. `python3 dev.py compile-check` prints registers and spills per kernel.

The sources are compiled in a fresh process: on a machine with a GPU, NVRTC stops reporting
ptxas's resource usage once the test process has created a CUDA context (seen on the H200)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsa_tutorial import kernels

SOURCES = kernels.kernel_names()

_COMPILE_ALL = """
import json, sys
from dsa_tutorial import kernels
result = {}
for name in kernels.kernel_names():
    try:
        compiled = kernels.compile_source(name, "sm_90", use_cache=False)
        result[name] = {"usage": compiled.resource_usage(), "log": compiled.log, "error": None}
    except kernels.KernelCompileError as exc:
        result[name] = {"usage": {}, "log": "", "error": str(exc)}
json.dump(result, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    done = subprocess.run([sys.executable, "-c", _COMPILE_ALL], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", SOURCES)
def test_compiles_for_sm90(compiled, name):
    result = compiled[name]
    assert result["error"] is None, result["error"]
    usage = result["usage"]
    assert usage, f"cuda/{name}.cu defines no kernel (is it extern \"C\" __global__?); NVRTC log:\n{result['log']}"
    assert "warning" not in result["log"].lower(), f"cuda/{name}.cu compiles with warnings:\n{result['log']}"
    heavy = {k: u for k, u in usage.items() if u["spill_stores"] > 256 or u["stack"] > 4096}
    assert not heavy, f"cuda/{name}.cu spills heavily: {heavy}"


def test_compile_reports_registers_per_kernel(compiled):
    usage = compiled["rms_norm"]["usage"]
    assert set(usage) == {"rms_norm_f32", "rms_norm_bf16", "rms_norm_bf16_vec"}
    assert all(u["registers"] > 0 and u["spill_stores"] == 0 for u in usage.values())
