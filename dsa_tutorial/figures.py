"""The chapters' performance figures, drawn from what the benchmarks measured on the GPU.

Each ``benchmarks/*.py`` writes one JSON file per operation into ``book/data/kernels/`` (see
:class:`dsa_tutorial.bench.Results`): the ceilings of the chip measured in that run, and one row per
timed line (the torch baseline, the public call with its default arguments, every kernel version),
each with the work it did. The figures read those files, so they render anywhere, GPU or not:

    kernel_results("index_scores")       the JSON of one operation
    progression("index_scores")          kernels 1..N of one operation against baseline and ceiling
    roofline()                           every operation's default kernel on the chip's roofline
    side_by_side("deepgemm_side_by_side")   a public anchor against this package's call, case by case
    layer_cost()                         dense against DSA attention per token, 4K to 128K (layer.json)

Rates are quoted against the ceiling each row names: "copy" (bytes moved per second against the
device-to-device copy), "bf16" or "fp8" (FLOP/s against the dense GEMM of that type).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .bench import RESULTS_DIR  # where the benchmarks write, and so where the figures read

__all__ = ["OPERATIONS", "kernel_results", "rate", "progression", "anchor_pairs", "side_by_side", "roofline",
           "layer_results", "layer_cost"]


#: Every operation with a kernel table, in the order of the chapters.
OPERATIONS = ("rms_norm", "kv_compress", "latent_scores", "apply_rope", "index_scores", "select_topk",
              "sparse_mla_attention", "act_quant", "mqa_logits", "paged_mqa_logits", "sparse_mla_decode_fp8",
              "sparse_mla_prefill")

_CEILING_NAMES = {"copy": "copy bandwidth", "bf16": "bf16 GEMM", "fp8": "FP8 GEMM"}


def kernel_results(operation: str, directory: Path | None = None) -> dict:
    """The measurements of one operation, as the benchmark wrote them."""
    path = Path(directory or RESULTS_DIR) / f"{operation}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no measurements for {operation!r} at {path}: run the benchmark that writes it "
                                f"on a GPU (see its module docstring)")
    return json.loads(path.read_text())


def rate(row: dict, ceilings: dict) -> tuple[float, float]:
    """(achieved rate, its fraction of the row's ceiling): TB/s against "copy", TFLOP/s against
    "bf16"/"fp8"."""
    seconds = row["us"] * 1e-6
    if row["ceiling"] == "copy":
        achieved = row["bytes"] / seconds / 1e12
        return achieved, achieved / ceilings["copy_tbps"]
    achieved = row["flops"] / seconds / 1e12
    return achieved, achieved / ceilings[f"{row['ceiling']}_tflops"]


def _label(row: dict) -> str:
    if row["role"] == "default":
        return row["label"] if row["label"] != "default" else "public call, defaults"
    return row["label"]


def progression(operation: str, cases: list[str] | None = None, directory: Path | None = None,
                anchor: str | None = None):
    """One panel per case: the baseline(s), the public call with its defaults and every kernel
    version, as bars of the fraction of the ceiling they reached (log scale), each labelled with its
    time. `anchor`: a side-by-side run (e.g. "deepgemm_side_by_side") whose anchor row for the same case
    ("<operation> <case>") is drawn on top, in red, as the fraction of its own run's ceiling. Returns the
    matplotlib figure."""
    import matplotlib.pyplot as plt

    data = kernel_results(operation, directory)
    ceilings = data["ceilings"]
    anchors = {}
    if anchor is not None:
        side = kernel_results(anchor, directory)
        anchors = {case.removeprefix(operation + " "): dict(row, role="anchor", label=f"{row['label']} (its run)",
                                                              share=rate(row, side["ceilings"])[1])
                   for case, row, _ in anchor_pairs(side) if case.startswith(operation + " ")}
    names = list(dict.fromkeys(row["case"] for row in data["rows"]))
    if cases is not None:
        unknown = [c for c in cases if c not in names]
        if unknown:
            raise KeyError(f"{operation} has no case {unknown}; its cases: {names}")
        names = list(cases)
    heights = [sum(row["case"] == name for row in data["rows"]) + (name in anchors) for name in names]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 0.8 + 0.34 * sum(heights) + 0.5 * len(names)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = {"baseline": "#9a9a9a", "default": "#4c7a00", "kernel": "#3b75af", "anchor": "#b5452b"}
    for ax, name in zip(axes[:, 0], names):
        rows = ([anchors[name]] if name in anchors else []) + [row for row in data["rows"] if row["case"] == name]
        fractions = [100 * (row["share"] if row["role"] == "anchor" else rate(row, ceilings)[1]) for row in rows]
        y = range(len(rows))[::-1]
        ax.barh(list(y), fractions, color=[colors[row["role"]] for row in rows], height=0.7)
        ax.set_yticks(list(y), [_label(row) for row in rows], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(min(fractions) / 3, 400)
        ticks = [t for t in (0.01, 0.1, 1, 3, 10, 30, 100) if t >= min(fractions) / 3]
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.axvline(100, color="black", lw=1, ls="--")
        for yi, fraction, row in zip(y, fractions, rows):
            ax.text(fraction * 1.08, yi, f"{row['us']:,.0f} µs  ({fraction:.1f}%)", va="center", fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
        ceiling = _CEILING_NAMES[rows[0]["ceiling"]]
        ax.set_title(f"{name}: % of the {ceiling} ceiling", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    env = data["environment"]
    fig.suptitle(f"{operation} on {env['device']} (torch {env['torch']}, {env['date']}); dashed line: the ceiling "
                 f"measured in the same run", fontsize=8)
    fig.tight_layout()
    return fig


def anchor_pairs(data: dict) -> list[tuple[str, dict, dict]]:
    """The cases of a side-by-side run (kernel_results of e.g. "deepgemm_side_by_side"), in order, as
    (case, the anchor's "baseline" row, this package's "default" row); ValueError for a case without
    exactly those two rows."""
    pairs = []
    for case in dict.fromkeys(row["case"] for row in data["rows"]):
        roles = {row["role"]: row for row in data["rows"] if row["case"] == case}
        if sorted(roles) != ["baseline", "default"]:
            raise ValueError(f"{data['operation']}, {case}: needs one baseline row and one default row, "
                             f"has {sorted(roles)}")
        pairs.append((case, roles["baseline"], roles["default"]))
    return pairs


def side_by_side(name: str, directory: Path | None = None):
    """A public anchor (the "baseline" rows, e.g. DeepGEMM or FlashMLA built from source) against this
    package's public call with its default arguments (the "default" rows), timed in the same run: one pair
    of bars per case, the fraction of the case's ceiling each reached, labelled with its time, and our
    speed as a fraction of the anchor's. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    data = kernel_results(name, directory)
    ceilings = data["ceilings"]
    pairs = anchor_pairs(data)
    colors = {"baseline": "#9a9a9a", "default": "#4c7a00"}
    fig, ax = plt.subplots(figsize=(7.5, 1.0 + 0.36 * len(pairs)))
    for i, (case, theirs, ours) in enumerate(pairs):
        y = len(pairs) - 1 - i
        for offset, row in ((0.19, theirs), (-0.19, ours)):
            fraction = 100 * rate(row, ceilings)[1]
            ax.barh(y + offset, fraction, height=0.36, color=colors[row["role"]])
            ax.text(fraction - 1, y + offset, f"{row['us']:,.1f} µs", va="center", ha="right", fontsize=6.5,
                    color="white")
        ax.text(103, y, f"{theirs['us'] / ours['us']:.2f}x", va="center", fontsize=8)
    ceiling_short = {"copy": "copy", "bf16": "bf16", "fp8": "FP8"}
    ax.set_yticks(range(len(pairs))[::-1], [f"{case.split(' | ')[0]} [{ceiling_short[theirs['ceiling']]}]"
                                            for case, theirs, _ in pairs], fontsize=7.5)
    ax.set_xlim(0, 115)
    ax.set_xticks([0, 20, 40, 60, 80, 100], ["0", "20%", "40%", "60%", "80%", "100%"])
    ax.axvline(100, color="black", lw=1, ls="--")
    ax.tick_params(axis="x", labelsize=7)
    anchor = pairs[0][1]["label"]
    ax.legend([Patch(color=colors["baseline"]), Patch(color=colors["default"])],
              [anchor, "this package, public call with defaults"], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.04 - 0.5 / len(pairs)), ncol=2, frameon=False)
    env = data["environment"]
    fig.suptitle(f"% of the ceiling in brackets, measured in the same run ({env['device']}, {env['date']});\n"
                 f"right of the dashed line: our speed as a fraction of {anchor}'s", fontsize=8.5, x=0.01,
                 ha="left")
    fig.tight_layout()
    return fig


def roofline(operations: tuple[str, ...] = OPERATIONS, directory: Path | None = None):
    """Left: the public call (default arguments) of every operation that does arithmetic, at its
    arithmetic intensity (FLOP per byte it must move) and the rate it reached, under the roofs of the
    chip (copy bandwidth times intensity, capped by the bf16 and FP8 GEMM rates; the median of the
    ceilings measured in the runs; each point's own fraction is against its own run's). Right: the memory-bound operations as a fraction of the
    copy bandwidth. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    loaded = {op: kernel_results(op, directory) for op in operations}
    copy, bf16, fp8 = (statistics.median(d["ceilings"][key] for d in loaded.values())
                       for key in ("copy_tbps", "bf16_tflops", "fp8_tflops"))
    n_bars = sum(row["role"] == "default" and not (row["flops"] and row["bytes"])
                 for d in loaded.values() for row in d["rows"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(4.2, 1.2 + 0.22 * n_bars)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    points = [row["flops"] / row["bytes"] for d in loaded.values() for row in d["rows"] if row["flops"] and row["bytes"]]
    low, high = min(points + [fp8 / copy]) / 4, max(points + [fp8 / copy]) * 4
    intensity = [low * (high / low) ** (i / 99) for i in range(100)]
    left.plot(intensity, [min(copy * x, fp8) for x in intensity], color="black", lw=1, label=f"FP8 roof ({fp8:.0f})")
    left.plot(intensity, [min(copy * x, bf16) for x in intensity], color="black", lw=1, ls="--",
              label=f"bf16 roof ({bf16:.0f}); slope: copy {copy:.2f} TB/s")
    markers = iter("o^sDvP*Xh<>")
    bars = []
    for op, data in loaded.items():
        rows = [row for row in data["rows"] if row["role"] == "default"]
        if all(row["flops"] and row["bytes"] for row in rows):
            achieved = [row["flops"] / (row["us"] * 1e-6) / 1e12 for row in rows]
            ai = [row["flops"] / row["bytes"] for row in rows]
            left.scatter(ai, achieved, marker=next(markers), s=30, label=op, zorder=3)
        else:
            for row in rows:
                label = row["case"] + ("" if row["label"] == "default" else f", {row['label'].removeprefix('default, ')}")
                bars.append((f"{op}: {label}", 100 * rate(row, data["ceilings"])[1]))
    left.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte moved)", ylabel="TFLOP/s",
             title="compute: public calls on the roofline")
    left.legend(fontsize=6, loc="lower right")
    right.barh(range(len(bars))[::-1], [b[1] for b in bars], color="#4c7a00")
    right.set_yticks(list(range(len(bars))[::-1]), [b[0] for b in bars], fontsize=7)
    right.axvline(100, color="black", lw=1, ls="--")
    right.set(xlim=(0, 110), xlabel="% of copy bandwidth", title="memory-bound: public calls")
    for i, (_, value) in enumerate(bars):
        right.text(value + 1, len(bars) - 1 - i, f"{value:.0f}%", va="center", fontsize=6)
    devices = sorted({d["environment"]["device"] for d in loaded.values()})
    fig.suptitle(f"Every operation's public call on {', '.join(devices)}", fontsize=9)
    fig.tight_layout()
    return fig


def layer_results(directory: Path | None = None) -> dict:
    """What benchmarks/layer.py measured: book/data/layer.json."""
    path = Path(directory or RESULTS_DIR.parent) / "layer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no layer measurements at {path}: run benchmarks/layer.py on a GPU")
    return json.loads(path.read_text())


def layer_cost(directory: Path | None = None):
    """Time per token against context length, prefill and decode side by side: dense attention as a
    line (and, dotted, what it would cost at the run's ceilings), DSA as stacked components (indexer,
    top-k, sparse attention), and the chained DSA call as a dashed line (the components timed alone
    do not include what chaining them costs or saves). The decode panel has a log time axis (dense
    decode grows 30-fold over the lengths): there the bands' edges are the cumulative sums, not their
    heights. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    data = layer_results(directory)
    rows = data["lengths"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"indexer": "#3b75af", "topk": "#8fb8de", "attention": "#4c7a00"}
    for ax, phase in zip(axes, ("prefill", "decode")):
        per = [row["L"] if phase == "prefill" else data["decode_batch"] for row in rows]
        have = [row for row in rows if "dsa" in row[phase]]
        lengths = [row["L"] for row in rows]
        ax.plot(lengths, [row[phase]["dense"]["total_us"] / n for row, n in zip(rows, per)], "o-", color="black",
                label="dense, measured")
        if all("bound_us" in row[phase]["dense"] for row in rows):
            ax.plot(lengths, [row[phase]["dense"]["bound_us"] / n for row, n in zip(rows, per)], ":", color="black",
                    label="dense at the ceiling")
        if have:
            x = [row["L"] for row in have]
            n = [row["L"] if phase == "prefill" else data["decode_batch"] for row in have]
            parts = [[row[phase]["dsa"][f"{part}_us"] / m for row, m in zip(have, n)] for part in colors]
            ax.stackplot(x, *parts, colors=list(colors.values()), labels=[f"DSA: {p}" for p in colors], alpha=0.85)
            ax.plot(x, [row[phase]["dsa"]["total_us"] / m for row, m in zip(have, n)], "k--", lw=1,
                    label="DSA, chained")
        ax.set_xscale("log", base=2)
        if phase == "decode":  # dense decode grows 30-fold over the lengths: a log axis keeps DSA's parts visible
            ax.set_yscale("log")
        ax.set_xticks(lengths, [f"{L // 1024}K" for L in lengths])
        unit = "per token" if phase == "prefill" else f"per token (batch {data['decode_batch']})"
        ax.set(xlabel="context length L", ylabel=f"µs {unit}", title=phase)
        ax.legend(fontsize=7, loc="upper left")
    env = data["environment"]
    fig.suptitle(f"Attention of one V3.2 layer, k = {data['topk']}: {env['device']}, torch {env['torch']}, "
                 f"{env['date']}", fontsize=9)
    fig.tight_layout()
    return fig
