"""Show the code a chapter discusses, in the rendered book and in Jupyter alike.

    show(mla.kv_compress)                         a Python function, class or method
    show("dsa_tutorial/indexer.py", "Indexer.keys")  the same, named in a file of the repository
    show("cuda/index_scores.cu", "kernel 2")      one section of a CUDA file
    show("cuda/common.cuh", collapsed=True)       a whole file, folded away until clicked

A chapter calls :func:`show` in a code cell; the cell's output is the code, as Markdown (a fenced
block, highlighted by Jupyter and by the book's build alike) with the bare text as its plain form.
Because the output is stored in the notebook, strict nbval re-runs the cell and fails when the
stored listing no longer matches the file: the book never shows stale code.

Sections of a CUDA file are delimited by separator comments, a line of dashes after ``//``; the
section's title is the text after the dashes (``// ---------- kernel 2``), or, when there is none,
the text of the next comment line up to its first colon (``// kernel 1: one thread per score``).
A section runs from its separator to the next one.
"""
from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Listing", "show", "sections"]

ROOT = Path(__file__).resolve().parent.parent
_LANGUAGES = {".py": "python", ".cu": "cuda", ".cuh": "cuda"}
_SEPARATOR = re.compile(r"^// -{10,}\s*(.*?)\s*$")


@dataclass(frozen=True)
class Listing:
    """Code to display: Markdown for Jupyter and the book, the code itself as plain text."""

    code: str
    language: str
    title: str | None = None  # shown above the code (when collapsed: the line to click)
    collapsed: bool = False

    def _repr_markdown_(self) -> str:
        longest = max((len(run) for run in re.findall(r"`+", self.code)), default=0)
        fence = "`" * max(3, longest + 1)
        block = f"{fence}{self.language}\n{self.code}\n{fence}"
        if self.collapsed:
            summary = self.title or "the code"
            return f"<details>\n<summary>{summary}</summary>\n\n{block}\n\n</details>\n"
        return f"{self.title}\n\n{block}\n" if self.title else block + "\n"

    def __repr__(self) -> str:
        return self.code


def sections(path: str | Path) -> dict[str, tuple[int, int]]:
    """The titled sections of a CUDA file: title -> (first line, end line), 0-based, end exclusive.
    "header" is what comes before the first separator: the file's opening comment, includes, sizes."""
    lines = _read(path).splitlines()
    starts = []
    for number, line in enumerate(lines):
        match = _SEPARATOR.match(line)
        if not match:
            continue
        title = match[1]
        if not title and number + 1 < len(lines) and lines[number + 1].startswith("// "):
            title = lines[number + 1][3:].split(":")[0].strip()
        starts.append((title, number))
    starts.insert(0, ("header", 0))
    found = {}
    for i, (title, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(lines)
        while end > start and not lines[end - 1].strip():
            end -= 1
        if title in found:
            raise ValueError(f"{path}: two sections titled {title!r}")
        found[title] = (start, end)
    return found


def _read(path: str | Path) -> str:
    full = ROOT / path
    if not full.is_file():
        raise FileNotFoundError(f"{path} is not a file of the repository ({ROOT})")
    return full.read_text()


def _python_part(path: Path, text: str, name: str) -> str:
    """The source of the function or class `name` ("f", "Class", "Class.method") of a Python file,
    decorators and docstring included."""
    nodes, found = ast.parse(text).body, None
    for part in name.split("."):
        found = next((node for node in nodes if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and node.name == part), None)
        if found is None:
            raise KeyError(f"{path} defines no function or class {name!r}")
        nodes = found.body
    first = min([found.lineno] + [d.lineno for d in found.decorator_list])
    return textwrap.dedent("\n".join(text.splitlines()[first - 1:found.end_lineno]))


def show(what, part: str | None = None, *, collapsed: bool = False, title: str | None = None) -> Listing:
    """The source of `what`: a Python object (function, class, method), or a file of the repository
    given by its path from the repository root ("cuda/select_topk.cu"), whole or one `part` of it: a
    section title of a CUDA file (see :func:`sections`), a function or class of a Python file
    ("Indexer.forward"). `collapsed` folds it behind its `title` (default: the path and part), for
    code the reader may skip."""
    if isinstance(what, (str, Path)):
        path = Path(what)
        language = _LANGUAGES.get(path.suffix)
        if language is None:
            raise ValueError(f"show() displays {sorted(_LANGUAGES)} files, not {path.name}")
        text = _read(path)
        if part is not None and language == "python":
            text = _python_part(path, text, part)
        elif part is not None:
            found = sections(path)
            if part not in found:
                raise KeyError(f"{path} has no section {part!r}; its sections: {sorted(found)}")
            start, end = found[part]
            text = "\n".join(text.splitlines()[start:end])
        if collapsed and title is None:
            title = f"<code>{path.as_posix()}</code>" + (f": {part}" if part else ", the whole file")
        return Listing(text.rstrip("\n"), language, title, collapsed)
    if part is not None:
        raise ValueError("a part applies to a file path, not to a Python object")
    try:
        code = inspect.getsource(what)
    except TypeError as exc:
        raise TypeError(f"show() takes a file path or a Python function, class or method, "
                        f"got {type(what).__name__}") from exc
    return Listing(textwrap.dedent(code).rstrip("\n"), "python", title, collapsed)
