"""bench.Results writes what figures read; the figures draw from it without a GPU."""
from __future__ import annotations

import json

import matplotlib
import pytest

matplotlib.use("Agg")

from dsa_tutorial import bench, figures  # noqa: E402

CEILINGS = bench.Ceilings(copy_tbps=4.0, bf16_tflops=800.0, fp8_tflops=1600.0, device="a test GPU")


def timing(us: float) -> bench.Timing:
    return bench.Timing(us, us * 0.9, us * 1.1, 10, 2)


def write_results(tmp_path, operation, *, flops, nbytes, ceiling):
    results = bench.Results(operation, CEILINGS)
    base = timing(1000.0)
    results.add("small", "baseline", base, label="torch", flops=flops, nbytes=nbytes, ceiling=ceiling)
    call = bench.CallTiming(timing(250.0), timing(248.0), 1, 30.0)
    line = results.add("small", "default", call, flops=flops, nbytes=nbytes, ceiling=ceiling, baseline=base)
    for version, us in ((1, 4000.0), (2, 250.0)):
        results.add("small", "kernel", timing(us), version=version, flops=flops, nbytes=nbytes, ceiling=ceiling)
    return results.write(tmp_path), line


def test_results_round_trip_and_rates(tmp_path):
    path, line = write_results(tmp_path, "index_scores", flops=2e12, nbytes=1e9, ceiling="bf16")
    assert "4.00x vs baseline" in line and "launch alone 248.0 us" in line
    data = json.loads(path.read_text())
    assert data["ceilings"]["bf16_tflops"] == 800.0 and data["environment"]["device"] == "a test GPU"
    default = [row for row in data["rows"] if row["role"] == "default"][0]
    assert default["us"] == 250.0 and default["launch_us"] == 248.0
    achieved, fraction = figures.rate(default, data["ceilings"])
    assert achieved == pytest.approx(8000.0) and fraction == pytest.approx(10.0)  # 2e12 FLOP in 250 us
    copy_row = dict(default, ceiling="copy")
    assert figures.rate(copy_row, data["ceilings"]) == pytest.approx((4.0, 1.0))  # 1e9 B in 250 us = 4 TB/s


def test_results_refuse_unknown_roles_and_ceilings():
    results = bench.Results("x", CEILINGS)
    with pytest.raises(ValueError, match="role"):
        results.add("c", "fast", timing(1.0))
    with pytest.raises(ValueError, match="ceiling"):
        results.add("c", "kernel", timing(1.0), version=1, ceiling="tf32")


def test_figures_draw_from_the_files(tmp_path):
    write_results(tmp_path, "index_scores", flops=2e12, nbytes=1e9, ceiling="bf16")
    write_results(tmp_path, "select_topk", flops=None, nbytes=1e9, ceiling="copy")
    fig = figures.progression("index_scores", directory=tmp_path)
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 4  # baseline, default, kernels 1 and 2
    with pytest.raises(KeyError, match="its cases"):
        figures.progression("index_scores", cases=["large"], directory=tmp_path)
    # an anchor's row for the same case, from a side-by-side run, drawn on top (one bar more)
    side = bench.Results("anchor_side_by_side", CEILINGS)
    data = figures.kernel_results("index_scores", directory=tmp_path)
    case = data["rows"][0]["case"]
    side.add(f"index_scores {case}", "baseline", timing(50.0), label="Anchor abc", flops=2e12, ceiling="bf16")
    side.add(f"index_scores {case}", "default", timing(60.0), baseline=timing(50.0), flops=2e12, ceiling="bf16")
    side.write(tmp_path)
    fig = figures.progression("index_scores", directory=tmp_path, anchor="anchor_side_by_side")
    assert len(fig.axes[0].patches) == 5
    assert fig.axes[0].get_yticklabels()[0].get_text() == "Anchor abc (its run)"  # the top bar
    fig = figures.roofline(("index_scores", "select_topk"), directory=tmp_path)
    left, right = fig.axes
    assert len(left.collections) == 1 and len(right.patches) == 1  # one compute point set, one memory bar
    with pytest.raises(FileNotFoundError, match="run the benchmark"):
        figures.kernel_results("paged_mqa_logits", directory=tmp_path)


def test_side_by_side_pairs_each_case(tmp_path):
    results = bench.Results("anchor_side_by_side", CEILINGS)
    for case, theirs, ours in (("a", 100.0, 125.0), ("b", 50.0, 200.0)):
        base = timing(theirs)
        results.add(case, "baseline", base, label="Anchor abc123", nbytes=4e8, ceiling="copy")
        results.add(case, "default", timing(ours), nbytes=4e8, ceiling="copy", baseline=base)
    results.write(tmp_path)
    fig = figures.side_by_side("anchor_side_by_side", directory=tmp_path)
    ax, = fig.axes
    widths = [round(p.get_width(), 6) for p in ax.patches if p.get_height() > 0]
    assert widths == [100.0, 80.0, 200.0, 50.0]  # 4e8 B in 100 us = 4 TB/s = 100% of copy; then ours
    assert [t.get_text() for t in ax.texts if t.get_text().endswith("x")] == ["0.80x", "0.25x"]
    results = bench.Results("lonely_side_by_side", CEILINGS)
    results.add("a", "default", timing(1.0), nbytes=1.0, ceiling="copy")
    results.write(tmp_path)
    with pytest.raises(ValueError, match="needs one baseline row and one default row"):
        figures.side_by_side("lonely_side_by_side", directory=tmp_path)


def test_every_operation_with_a_kernel_table_has_a_name_in_the_figures():
    from dsa_tutorial import kernels

    assert sorted(figures.OPERATIONS) == sorted(kernels.kernel_names())


def test_layer_cost_draws_dense_and_stacked_dsa(tmp_path):
    def phase(L, dsa=True):
        parts = {"dense": {"total_us": 4.0 * L, "peak_bytes": 1}}
        if dsa:
            parts["dsa"] = {"indexer_us": 1.0 * L, "topk_us": 0.5 * L, "attention_us": 1.5 * L, "total_us": 3.2 * L,
                            "peak_bytes": 1}
        return parts

    rows = [{"L": L, "prefill": phase(L, dsa=L > 4096), "decode": phase(L)} for L in (4096, 8192, 16384)]
    payload = {"decode_batch": 32, "topk": 2048, "environment": {"device": "a test GPU", "torch": "x", "date": "d"},
               "lengths": rows}
    (tmp_path / "layer.json").write_text(json.dumps(payload))
    fig = figures.layer_cost(directory=tmp_path)
    prefill, decode = fig.axes
    assert len(prefill.collections) == 3 and len(decode.collections) == 3  # indexer, top-k, attention
    dense = prefill.lines[0]
    assert list(dense.get_ydata()) == [4.0, 4.0, 4.0]  # per token: total / L
    assert list(decode.lines[0].get_ydata()) == [4.0 * L / 32 for L in (4096, 8192, 16384)]  # per token of a batch
    with pytest.raises(FileNotFoundError, match="layer.py"):
        figures.layer_results(directory=tmp_path / "nothing")
