"""The pieces every public call is built from: the data-check switch, one-line shape checks, the
kernel tables and the #define reader, launch recording. CPU only."""
from __future__ import annotations

import pytest
import torch

from dsa_tutorial import checks, compare, kernels
from dsa_tutorial.kernels import Kernel, KernelTable


# ----------------------------------------------------------------------------- the data-check switch

def test_switch_follows_the_environment_unless_set(monkeypatch):
    for value, on in (("1", True), ("on", True), ("0", False), ("", False)):
        monkeypatch.setenv("DSA_CHECK", value)
        assert checks.data_checks_enabled() is on
    monkeypatch.delenv("DSA_CHECK")
    assert not checks.data_checks_enabled()  # off by default
    checks.set_data_checks(True)
    try:
        assert checks.data_checks_enabled()
        with checks.data_checks(False):
            assert not checks.data_checks_enabled()
        assert checks.data_checks_enabled()  # restored
    finally:
        checks.set_data_checks(None)
    assert not checks.data_checks_enabled()
    with pytest.raises(TypeError):
        checks.set_data_checks("yes")


def test_device_data_is_checked_only_when_switched_on():
    # a tensor that is not on the CPU (the meta device stands in for a GPU here: reading its values
    # is impossible, so a check that tried would fail) is left alone with checks off ...
    wild = torch.empty(4, dtype=torch.int64, device="meta")
    with checks.data_checks(False):
        assert not checks.data_checks_wanted(wild)
        checks.check_range(wild, "positions", 0, 7)  # no read: nothing happens
    # ... and read with checks on
    with checks.data_checks(True):
        assert checks.data_checks_wanted(wild)
        with pytest.raises(Exception):
            checks.check_range(wild, "positions", 0, 7)


def test_cpu_data_is_always_checked():
    with checks.data_checks(False):
        assert checks.data_checks_wanted(torch.arange(3))
        with pytest.raises(ValueError, match="positions must be <= 7, got 9"):
            checks.check_range(torch.tensor([0, 9]), "positions", 0, 7)


def test_check_shapes_in_one_line():
    q, k = torch.zeros(2, 3, 4, 8), torch.zeros(2, 5, 8)
    dims = checks.check_shapes("q_abs[B, T, n_h, d_c] c_kv[B, S, d_c]", q, k, dtype=checks.FLOATS)
    assert dims == {"B": 2, "T": 3, "n_h": 4, "d_c": 8, "S": 5}
    with pytest.raises(ValueError, match="c_kv has d_c = 7"):
        checks.check_shapes("q_abs[B, T, n_h, d_c] c_kv[B, S, d_c]", q, torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match="must have shape"):
        checks.check_shapes("x[?, 576]", torch.zeros(3, 575))
    with pytest.raises(TypeError, match="c_kv must be float32"):
        checks.check_shapes("q[B, D] c_kv[B, D]", torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64),
                            same_dtype=True)
    with pytest.raises(ValueError, match="one 'name\\[dims\\]' per tensor"):
        checks.check_shapes("q[B, D]", q, k)
    assert checks.check_shapes("x[B, D]", torch.zeros(2, 3), dims={"D": 3}) == {"D": 3, "B": 2}


# ----------------------------------------------------------------------------- compare

def test_a_nan_in_the_reference_fails():
    ref = torch.tensor([1.0, float("nan"), 3.0])
    out = torch.tensor([1.0, 2.0, 3.0])
    result = compare.compare(out, ref, atol=1.0)
    assert not result.passed and result.ref_nan_count == 1
    assert "NaN in the reference" in str(result)
    with pytest.raises(AssertionError, match="reference"):
        compare.assert_close(out, ref, atol=1.0)
    assert compare.compare(out, out.clone()).passed


# ----------------------------------------------------------------------------- kernel tables

TABLE = KernelTable("demo", [
    Kernel(1, "demo_simple_{dtype}", "one thread per value"),
    Kernel(2, "demo_vector_{dtype}", "16-byte vectors", needs="16-byte aligned x"),
    Kernel(3, "demo_wgmma", "warpgroup MMA", needs="compute capability 9.0"),
], variants={"dtype": ("f32", "bf16")})


def test_table_versions_entries_and_description():
    assert TABLE.versions == (1, 2, 3) and len(TABLE) == 3 and [k.version for k in TABLE] == [1, 2, 3]
    assert TABLE.entry(2, dtype="bf16") == "demo_vector_bf16"
    assert TABLE.entry_points() == ["demo_simple_f32", "demo_simple_bf16", "demo_vector_f32", "demo_vector_bf16",
                                    "demo_wgmma"]
    with pytest.raises(ValueError, match="built for dtype in"):
        TABLE.entry(1, dtype="f16")
    with pytest.raises(ValueError, match="kernel must be None or a version of cuda/demo.cu: 1 \\(one thread"):
        TABLE[4]
    with pytest.raises(ValueError):
        TABLE["2"]  # a version is a number, as "kernel 2" in the chapters
    assert TABLE.describe().splitlines()[2:4] == ["kernel 2  demo_vector_{dtype}",
                                                  "    16-byte vectors; needs 16-byte aligned x"]


def test_choose_takes_the_best_that_applies_and_refuses_with_the_reason():
    assert TABLE.choose(None, {}).version == 3
    assert TABLE.choose(None, {3: "needs compute capability 9.0, this GPU has 8.9"}).version == 2
    assert TABLE.choose(1, {3: "no"}).version == 1
    with pytest.raises(ValueError, match="kernel 3 of cuda/demo.cu \\(warpgroup MMA\\) cannot run these inputs: "
                                         "needs compute capability 9.0"):
        TABLE.choose(3, {3: "needs compute capability 9.0"})
    with pytest.raises(ValueError, match="no kernel of cuda/demo.cu runs these inputs"):
        TABLE.choose(None, {1: "a", 2: "b", 3: "c"})
    other = KernelTable("demo", list(TABLE), best_first=(2, 3, 1))
    assert other.choose(None, {}).version == 2
    with pytest.raises(ValueError, match="best_first"):
        KernelTable("demo", list(TABLE), best_first=(1, 2))
    with pytest.raises(ValueError, match="distinct"):
        KernelTable("demo", [TABLE[1], TABLE[1]])


def test_defines_reads_the_sources_constants(tmp_path, monkeypatch):
    (tmp_path / "consts.cuh").write_text("#define FROM_HEADER 3\n")
    (tmp_path / "demo_defines.cu").write_text(
        '#include "consts.cuh"\n'
        "#define WARPS 4            // a comment\n"
        "#define THREADS (32 * WARPS)\n"
        "#define STAGES 5u\n"
        "#define SMEM_BYTES (STAGES * (THREADS + 4) / 2 + FROM_HEADER)\n"
        "#define LIMIT 448.0f\n"
        "#define MAX(a, b) ((a) > (b) ? (a) : (b))\n"
        "#if __CUDA_ARCH__ >= 900\n#define FAST 1\n#else\n#define FAST 0\n#endif\n"
        "  #  define INDENTED 7\n")
    monkeypatch.setenv("DSA_CUDA_DIR", str(tmp_path))
    kernels.defines.cache_clear()
    try:
        assert kernels.defines("demo_defines") == {"FROM_HEADER": 3, "WARPS": 4, "THREADS": 128, "STAGES": 5,
                                                   "SMEM_BYTES": 5 * 132 // 2 + 3, "INDENTED": 7}
    finally:
        kernels.defines.cache_clear()


def test_every_table_names_its_own_source():
    from tests.test_cuda_compile import TABLES

    for source, table in TABLES.items():
        assert table.source == source and kernels.source_path(source).is_file()
        assert table.defines() == kernels.defines(source)


def test_malformed_shape_spec_is_refused():
    with pytest.raises(ValueError, match="must be a list of 'name\\[dims\\]'"):
        checks.check_shapes("q[B, D", torch.zeros(2, 3))


def test_the_cache_format_constants_agree_with_the_kernels():
    from dsa_tutorial import paged

    assert paged.BLOCK_KV == kernels.defines("paged_mqa_logits")["BLOCK_KV"]


# ----------------------------------------------------------------------------- the README's map

def _readme_rows() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## From formula to kernel", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "`" in line]


def test_every_name_in_the_readme_table_exists():
    import importlib
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    rows = _readme_rows()
    assert len(rows) >= 10
    seen = 0
    for row in rows:
        modules = []
        for token in re.findall(r"`([^`]+)`", row):
            for name in (t.strip() for t in token.split(",")):
                if name.startswith("cuda/"):
                    assert (root / name).is_file(), f"README names {name}, which does not exist"
                elif name.startswith("test_"):
                    assert (root / "tests" / name).is_file(), f"README names tests/{name}"
                elif name.endswith(".py"):
                    assert (root / "benchmarks" / name).is_file(), f"README names benchmarks/{name}"
                elif re.fullmatch(r"\w+\.\w+", name):
                    module, attr = name.split(".")
                    modules.append(importlib.import_module(f"dsa_tutorial.{module}"))
                    assert hasattr(modules[-1], attr), f"README names dsa_tutorial.{name}, which does not exist"
                elif re.fullmatch(r"[A-Z_]+_KERNELS", name):
                    owner = [m for m in modules if hasattr(m, name)]
                    assert owner, f"README names the table {name}, which no module of its row defines"
                    table = getattr(owner[0], name)
                    versions = re.search(re.escape(name) + r"` \((\d+)-(\d+)\)", row)
                    assert versions and table.versions == tuple(range(int(versions[1]), int(versions[2]) + 1)), \
                        f"README gives {name} other versions than {table.versions}"
                elif name == "train":
                    importlib.import_module("dsa_tutorial.train")
                else:
                    continue
                seen += 1
    assert seen >= 40


def test_every_code_name_on_the_notation_page_exists():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sources = "\n".join(p.read_text() for p in [*root.glob("dsa_tutorial/**/*.py"), *root.glob("cuda/*.cu")])
    rows = [line for line in (root / "book" / "notation.md").read_text().splitlines()
            if line.startswith("| $") or line.startswith("| `")]
    assert len(rows) >= 25
    missing = []
    for row in rows:
        code_cell = row.strip().strip("|").split("|")[-2]
        for name in re.findall(r"`([^`]+)`", code_cell):
            for part in name.split("."):
                if not re.search(rf"\b{re.escape(part)}\b", sources):
                    missing.append(name)
    assert not missing, f"the notation page names what the code does not have: {missing}"
