"""Static checks of the chapters, shared by tests/test_notebooks.py.

`gpu_leaks(notebook)`: the names that a non-GPU cell reads but only a `gpu`-tagged cell defines.
Where no GPU is found the `gpu` cells are skipped, so such a name would be undefined there.
"""
from __future__ import annotations

import ast

import nbformat


def _python_source(cell_source: str) -> str:
    # IPython syntax (magics, shell escapes) is not Python: blank those lines out.
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in cell_source.splitlines())


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _module_level(node: ast.AST):
    """Walk a cell's nodes without entering functions, classes, lambdas or comprehensions."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, _SCOPES):
            yield from _module_level(child)


def _names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names a cell binds at notebook level, and global names it reads (anywhere in the cell)."""
    defined, local = set(), set()
    for node in _module_level(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            defined.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    read = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                read.add(node.id)
            elif node.id not in defined:
                local.add(node.id)  # bound inside a function or comprehension
        elif isinstance(node, ast.arg):
            local.add(node.arg)
    return defined, read - local


def gpu_leaks(nb: nbformat.NotebookNode) -> list[tuple[int, str]]:
    """(cell index, name) for each name a non-GPU cell reads whose latest definition, in notebook
    order, is in a `gpu` cell: skipped where no GPU is found, so the name would be undefined or stale."""
    defined_by: dict[str, str] = {}
    leaks = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        defined, read = _names(ast.parse(_python_source(cell.source)))
        if "gpu" in cell.metadata.get("tags", []):
            defined_by.update(dict.fromkeys(defined, "gpu"))
            continue
        leaks += [(index, name) for name in sorted(read - defined) if defined_by.get(name) == "gpu"]
        defined_by.update(dict.fromkeys(defined, "cpu"))
    return leaks
