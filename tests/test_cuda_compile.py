"""Every cuda/*.cu compiles for sm_90 with the loader's own options: the only check CUDA sources
get where there is no GPU. `python3 dev.py compile-check` prints registers and spills per kernel."""
from __future__ import annotations

import pytest

from dsa_tutorial import kernels

SOURCES = kernels.kernel_names()


@pytest.mark.parametrize("name", SOURCES)
def test_compiles_for_sm90(name):
    compiled = kernels.compile_source(name, "sm_90")
    usage = compiled.resource_usage()
    assert usage, f"cuda/{name}.cu defines no kernel (is it extern \"C\" __global__?); NVRTC log:\n{compiled.log}"
    assert "warning" not in compiled.log.lower(), f"cuda/{name}.cu compiles with warnings:\n{compiled.log}"
    heavy = {k: u for k, u in usage.items() if u["spill_stores"] > 256 or u["stack"] > 4096}
    assert not heavy, f"cuda/{name}.cu spills heavily: {heavy}"
