"""dsa_tutorial.show: the listings the chapters display are the repository's code, whole or in parts."""
from __future__ import annotations

import pytest

from dsa_tutorial import kernels, show as show_module
from dsa_tutorial.indexer import Indexer
from dsa_tutorial.show import Listing, sections, show


def test_python_object_and_named_part_agree():
    by_object = show(Indexer.keys)
    by_name = show("dsa_tutorial/indexer.py", "Indexer.keys")
    assert by_object.code == by_name.code
    assert by_object.code.startswith("def keys(")  # dedented out of the class
    assert by_object.language == "python"


def test_cuda_sections_cover_the_file_in_order():
    for name in kernels.kernel_names():
        path = f"cuda/{name}.cu"
        lines = (show_module.ROOT / path).read_text().splitlines()
        found = sections(path)
        assert next(iter(found)) == "header"
        spans = sorted(found.values())
        assert spans[0][0] == 0
        for (start, end), (next_start, _) in zip(spans, spans[1:]):
            assert start < end <= next_start and all(not line.strip() for line in lines[end:next_start])


def test_every_kernel_version_has_its_section_or_shares_the_header():
    """Each "kernel N" section a chapter may show exists where the file has separators for it."""
    found = sections("cuda/mqa_logits.cu")
    assert {"kernel 1", "kernel 2", "kernel 3", "kernel 4"} <= set(found)
    code = show("cuda/mqa_logits.cu", "kernel 4").code
    assert code.splitlines()[0].endswith("kernel 4") and "kernel 3" not in code.splitlines()[0]


def test_markdown_fences_outlast_backticks_in_the_code():
    listing = Listing("x = '```'", "python")
    assert listing._repr_markdown_().startswith("````python\n")
    folded = Listing("int x;", "cuda", "<code>a.cu</code>", collapsed=True)._repr_markdown_()
    assert folded.startswith("<details>\n<summary><code>a.cu</code></summary>\n\n```cuda\nint x;\n```")
    assert repr(Listing("int x;", "cuda")) == "int x;"


def test_collapsed_files_name_themselves():
    assert show("cuda/common.cuh", collapsed=True).title == "<code>cuda/common.cuh</code>, the whole file"
    assert show("cuda/common.cuh", "conversions", collapsed=True).title == "<code>cuda/common.cuh</code>: conversions"


@pytest.mark.parametrize("args, error", [
    (("cuda/nope.cu",), FileNotFoundError),
    (("cuda/mqa_logits.cu", "kernel 9"), KeyError),
    (("dsa_tutorial/indexer.py", "Indexer.nope"), KeyError),
    (("README.md",), ValueError),
    ((Indexer.keys, "kernel 1"), ValueError),
    ((42,), TypeError),
])
def test_refuses_what_it_cannot_show(args, error):
    with pytest.raises(error):
        show(*args)
