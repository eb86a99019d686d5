"""Static checks over every chapter: GPU cells leak nothing, outputs are stored, metadata is sane."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from notebook_checks import gpu_leaks

BOOK = Path(__file__).resolve().parent.parent / "book"
CHAPTERS = sorted(BOOK.glob("*.ipynb"))


def _nb(cells):
    nb = nbformat.v4.new_notebook()
    for source, tags in cells:
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags}))
    return nb


def test_chapters_exist():
    assert CHAPTERS, f"no chapters in {BOOK}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_no_name_flows_from_gpu_cells(path):
    leaks = gpu_leaks(nbformat.read(path, as_version=4))
    assert not leaks, f"{path.name}: non-GPU cells read names only gpu cells define: {leaks}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_chapter_is_executed_and_titled(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel must be python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    unexecuted = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()
                  and c.execution_count is None and "gpu" not in c.metadata.get("tags", [])]
    assert code and not unexecuted, f"{path.name}: cells {unexecuted} have no stored outputs"
    titles = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()
              if line.startswith("# ")]
    assert len(titles) == 1, f"{path.name}: needs exactly one '# ' title, found {titles}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: stored outputs contain an error"


def test_leak_checker_finds_a_gpu_only_name():
    nb = _nb([("import torch", []), ("y = torch.ones(3, device='cuda')", ["gpu"]), ("print(y.sum())", [])])
    assert gpu_leaks(nb) == [(2, "y")]


def test_leak_checker_finds_a_name_a_gpu_cell_overwrote():
    nb = _nb([("x = 1", []), ("x = 2", ["gpu"]), ("print(x)", [])])
    assert gpu_leaks(nb) == [(2, "x")]


def test_leak_checker_accepts_clean_notebooks():
    nb = _nb([("import torch\nx = torch.ones(3)", []),
              ("%time y = x.cuda()\nprint([v for v in y])\ndef f(a):\n    return a", ["gpu"]),
              ("x = x + 1\nprint([a for a in x])", [])])
    assert gpu_leaks(nb) == []


def test_nbval_skips_gpu_cells_without_a_gpu(tmp_path):
    """Run nbval, through this repository's conftest, on a notebook whose `gpu` cell fails without
    a GPU: where no GPU is found it must be skipped, where one is found it must run and pass."""
    import os
    import subprocess
    import sys

    from dsa_tutorial.kernels import gpu_available

    root = Path(__file__).resolve().parent.parent
    nb = _nb([("x = 1", []),
              ("from dsa_tutorial.kernels import require_gpu\nrequire_gpu()", ["gpu"]),
              ("print(x + 1)", [])])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    from nbclient import NotebookClient  # store the outputs nbval compares against (the gpu cell left unrun)

    client = NotebookClient(nb, kernel_name="python3")
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        client.execute_cell(nb.cells[2], 2)
    path = tmp_path / "gated.ipynb"
    nbformat.write(nb, path)
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("DSA_REQUIRE_GPU", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "--nbval", "--nbval-current-env",
                             "-p", "no:cacheprovider", "-q", str(path)], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    expected = "3 passed" if gpu_available() else "2 passed, 1 skipped"
    assert result.returncode == 0 and expected in result.stdout, result.stdout + result.stderr
