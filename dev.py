#!/usr/bin/env python3
"""The book's developer commands. Needs only Python >= 3.10 and pip.

    python3 dev.py book            build the rendered book into _build/html
    python3 dev.py check-book      read the built book in headless Chromium (math, overflow, links, images)
    python3 dev.py jupyter [--gpu] open the chapters in JupyterLab (--gpu: with CuPy, to run GPU cells)
    python3 dev.py test            run every test: pytest over tests/ and strict nbval over book/
    python3 dev.py gpu             the GPU suite: the same, with GPU tests and GPU cells required
    python3 dev.py refresh [NB..]  re-execute chapters in place, refreshing their stored outputs
    python3 dev.py compile-check   compile every cuda/*.cu for sm_90a with NVRTC; registers, spills
    python3 dev.py listings        update the stored code listings (the chapters' `show(...)` cells)

`book` and `test` create `.venv/` and install what they need there (`book` only the book's build
tools: it executes nothing, so it needs no torch), unless they already run
inside a virtual environment or `--system` is given (use it where nothing can be installed, e.g.
on a GPU machine without a package index). `gpu`, `refresh` and `compile-check` use the current
interpreter.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
# A CPU build of torch is enough for everything except the kernels; this pin keeps a fresh
# environment from pulling a multi-GB CUDA build where a CPU wheel is at hand.
TORCH_SPEC = os.environ.get("DSA_TORCH_SPEC", "torch==2.13.0")


def _in_venv() -> bool:
    return sys.prefix != getattr(sys, "base_prefix", sys.prefix)


def _python(extras: str, system: bool, *, package: bool = True) -> str:
    """The interpreter to use. When we manage the environment: with the package and its `.[extras]`
    installed (package=True), or only the requirements of those extras (package=False: the book's
    build reads the notebooks' stored outputs and the sources as text, so it needs no torch)."""
    if system:
        return sys.executable
    if _in_venv():
        python = sys.executable
    else:
        python = str(VENV / "bin" / "python")
        if not Path(python).exists():
            print(f"creating {VENV}", flush=True)
            venv.EnvBuilder(with_pip=True).create(VENV)
    kind = "" if package else "-only"
    stamp = Path(python).parent.parent / f".dsa_tutorial-{extras.replace(',', '-')}{kind}"
    pyproject = ROOT / "pyproject.toml"
    if not stamp.exists() or stamp.stat().st_mtime < pyproject.stat().st_mtime:
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
        if package:
            have_torch = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
            if not have_torch:
                _run(pip + [TORCH_SPEC])
            _run(pip + ["-e", f"{ROOT}[{extras}]"])
        else:
            _run(pip + [r for extra in extras.split(",") for r in _extra_requirements(extra)])
        stamp.touch()
    return python


def _extra_requirements(extra: str) -> list[str]:
    """The requirements pyproject.toml lists for one optional extra (one line, `name = [...]`)."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf"^{re.escape(extra)} = \[(.*)\]\s*$", text, re.M)
    if not match:
        sys.exit(f"pyproject.toml has no one-line optional extra {extra!r}")
    return re.findall(r'"([^"]+)"', match[1])


def _run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, **kwargs)
    if result.returncode != 0:
        sys.exit(result.returncode)


def _pytest(python: str, extra: list[str]) -> None:
    # One pytest run: the unit tests, the CUDA compile check, and strict nbval over the chapters
    # (--nbval compares every stored output; --nbval-current-env runs them in this interpreter).
    _run([python, "-m", "pytest", "tests", "book", "--nbval", "--nbval-current-env", "-p", "no:cacheprovider",
          "-ra", *extra])


def cmd_test(args) -> None:
    python = _python("test,nvrtc", args.system)
    _run([python, str(ROOT / "dev.py"), "compile-check"])
    _pytest(python, args.pytest_args)


def cmd_gpu(args) -> None:
    os.environ["DSA_REQUIRE_GPU"] = "1"  # a missing GPU fails the run instead of skipping
    _pytest(sys.executable, args.pytest_args)


def cmd_book(args) -> None:
    python = _python("book", args.system, package=False)
    _run([str(Path(python).parent / "jupyter-book"), "build", str(ROOT), "--builder", "html", "-W", "-n", "--keep-going"])
    index = ROOT / "_build" / "html" / "index.html"
    print(f"\nThe book is built. Open {index.as_uri()}")


def cmd_check_book(args) -> None:
    """The built book in headless Chromium (tests/browser_book.py); installs Debian's chromium when
    missing and allowed (root with apt-get), and Playwright into the book's environment."""
    python = _python("book", args.system, package=False)
    chromium = os.environ.get("DSA_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        if os.geteuid() == 0 and shutil.which("apt-get"):
            _run(["apt-get", "update", "-q"])
            _run(["apt-get", "install", "-y", "-q", "chromium", "fonts-dejavu-core", "fonts-liberation"])  # the fonts the layout checks were made with
        else:
            sys.exit(f"no Chromium at {chromium}: install Debian's chromium package (or set DSA_CHROMIUM)")
    have = subprocess.run([python, "-c", "import playwright, pytest"], capture_output=True).returncode == 0
    if not have:
        _run([python, "-m", "pip", "install", "--disable-pip-version-check", "playwright>=1.40", "pytest>=7"])
    _run([python, "-m", "pytest", str(ROOT / "tests" / "browser_book.py"), "-p", "no:cacheprovider", "-q",
          "-o", "addopts=", *args.pytest_args])
    print(f"screenshots of every page: {ROOT / '_build' / 'screenshots'}")


def cmd_jupyter(args) -> None:
    """JupyterLab on book/, in .venv with the package (CPU torch unless one is there), its `jupyter`
    extra and, with --gpu, the `gpu` extra (CuPy and NVRTC) so the cells tagged `gpu` run too."""
    python = _python("jupyter,gpu" if args.gpu else "jupyter", args.system)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    _run([python, "-m", "jupyter", "lab", f"--notebook-dir={ROOT / 'book'}", *args.pytest_args])


def cmd_compile_check(args) -> None:
    sys.path.insert(0, str(ROOT))
    from dsa_tutorial import kernels

    arch = args.arch or kernels.DEFAULT_ARCH
    failed = []
    print(f"compiling for {arch}")
    print(f"{'kernel':<40} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>6} {'smem':>6}")
    for name in kernels.kernel_names():
        try:
            compiled = kernels.compile_source(name, arch)
        except kernels.KernelCompileError as exc:
            failed.append(name)
            print(exc)
            continue
        for kernel, use in compiled.resource_usage().items():
            print(f"{name + ':' + kernel:<40} {use['registers']:>5} {use['spill_stores']:>9} "
                  f"{use['spill_loads']:>9} {use['stack']:>6} {use['smem']:>6}")
    if failed:
        sys.exit(f"compile check failed for: {', '.join(failed)}")


def cmd_refresh(args) -> None:
    sys.path.insert(0, str(ROOT))
    import nbformat
    from nbclient import NotebookClient

    from dsa_tutorial.kernels import gpu_available

    notebooks = [Path(p).resolve() for p in args.notebooks] or sorted((ROOT / "book").glob("*.ipynb"))
    have_gpu = gpu_available()
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        skipped = 0
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                if "gpu" in cell.metadata.get("tags", []) and not have_gpu:
                    skipped += 1  # keep the outputs a GPU run stored
                    continue
                client.execute_cell(cell, index)
        nbformat.write(nb, path)
        note = f", {skipped} gpu cells kept as stored (no GPU here)" if skipped else ""
        print(f"refreshed {path.relative_to(ROOT)}{note}", flush=True)


def cmd_listings(args) -> None:
    """Re-run only the chapters' listing cells, `show(...)` calls, in this process: after a change to
    code a chapter shows, its stored listing is stale and strict nbval says so; this updates it
    without executing anything else."""
    sys.path.insert(0, str(ROOT))
    import nbformat

    from dsa_tutorial.show import show

    for path in sorted((ROOT / "book").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        changed = 0
        for cell in nb.cells:
            if cell.cell_type != "code" or not cell.source.startswith("show("):
                continue
            listing = eval(cell.source, {"show": show})  # noqa: S307 (the book's own cells)
            data = {"text/markdown": listing._repr_markdown_(), "text/plain": repr(listing)}
            if not cell.outputs or cell.outputs[0].get("data") != data:
                count = cell.execution_count or 1
                cell.execution_count = count
                cell.outputs = [nbformat.v4.new_output("execute_result", data=data, execution_count=count)]
                changed += 1
        if changed:
            nbformat.write(nb, path)
            print(f"{path.relative_to(ROOT)}: {changed} listings updated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in [("test", cmd_test, "run the whole test suite (CPU)"),
                             ("book", cmd_book, "build the rendered book")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--system", action="store_true", help="use this interpreter; install nothing")
        p.set_defaults(func=func, takes_pytest_args=name != "book")
    p = sub.add_parser("check-book", help="read the built book in headless Chromium (after `book`)")
    p.add_argument("--system", action="store_true", help="use this interpreter; install nothing in .venv")
    p.set_defaults(func=cmd_check_book, takes_pytest_args=True)
    p = sub.add_parser("jupyter", help="open the chapters in JupyterLab (installs the jupyter extra in .venv)")
    p.add_argument("--gpu", action="store_true", help="also install the gpu extra (CuPy) to run the GPU cells")
    p.add_argument("--system", action="store_true", help="use this interpreter; install nothing")
    p.set_defaults(func=cmd_jupyter, takes_pytest_args=True)  # anything else goes to `jupyter lab`
    p = sub.add_parser("gpu", help="run the whole suite with GPU tests and cells required (this interpreter)")
    p.set_defaults(func=cmd_gpu, takes_pytest_args=True)
    p = sub.add_parser("refresh", help="re-execute chapters in place")
    p.add_argument("notebooks", nargs="*", help="default: every book/*.ipynb")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    p.set_defaults(func=cmd_refresh)
    p = sub.add_parser("listings", help="update the chapters' stored code listings (show cells) only")
    p.set_defaults(func=cmd_listings)
    p = sub.add_parser("compile-check", help="compile every cuda/*.cu with NVRTC, no GPU needed")
    p.add_argument("--arch", default=None, help="default: dsa_tutorial.kernels.DEFAULT_ARCH (sm_90a, the H200)")
    p.set_defaults(func=cmd_compile_check)
    args, extra = parser.parse_known_args()
    if extra and not getattr(args, "takes_pytest_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.pytest_args = extra  # `test` and `gpu` pass anything else on to pytest (-k indexer -x), `jupyter` to lab
    args.func(args)


if __name__ == "__main__":
    main()
