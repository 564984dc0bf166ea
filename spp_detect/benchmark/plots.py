"""The speed report's table (markdown, next to the papers' figures) and its stacked bar chart.

Input is the report ``benchmark.speed_report.run_speed_report`` returns (the content of
``speed.json``). Plots use matplotlib's Agg canvas directly (no pyplot, no global backend).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, List, Mapping, Sequence, Union

from spp_detect.utils import atomic_write_bytes

__all__ = [
    "PAPER_SPP_TABLE",
    "PAPER_FAST_RCNN_TABLE",
    "STAGE_ORDER",
    "format_speed_markdown",
    "plot_speed",
]

PathLike = Union[str, os.PathLike]

# SPP-net (TPAMI 2015, Table 10): VOC2007 test, ZF-5, fine-tuned fc7 + box regression, one
# GPU, seconds per image, proposals excluded; speed-ups against R-CNN with the same ZF-5.
PAPER_SPP_TABLE = (
    {"method": "SPP-net, 1 scale (688)", "conv": 0.053, "fc": 0.089, "total": 0.142,
     "speedup": 102, "mAP": 58.0},
    {"method": "SPP-net, 5 scales", "conv": 0.293, "fc": 0.089, "total": 0.382,
     "speedup": 38, "mAP": 59.2},
    {"method": "R-CNN (ZF-5)", "conv": 14.37, "fc": 0.089, "total": 14.46,
     "speedup": 1, "mAP": 59.2},
)  # fmt: skip

# Fast R-CNN (ICCV 2015, Table 4): VGG16, VOC2007 test, test time per image (GPU).
PAPER_FAST_RCNN_TABLE = (
    {"method": "R-CNN", "time": 47.0, "mAP": 66.0},
    {"method": "SPP-net", "time": 2.3, "mAP": 63.1},
    {"method": "Fast R-CNN", "time": 0.32, "mAP": 66.9},
    {"method": "Fast R-CNN, truncated SVD fc6/fc7", "time": 0.22, "mAP": 66.6},
)

# Stages in pipeline order (anything else a detector reports is appended).
STAGE_ORDER = (
    "proposals", "preprocess", "crop_warp", "conv", "pool", "fc", "classify", "bbox_reg", "nms",
)  # fmt: skip

_STAGE_COLORS = {
    "proposals": "#bbbbbb",
    "preprocess": "#8c564b",
    "crop_warp": "#e377c2",
    "conv": "#1f77b4",
    "pool": "#ff7f0e",
    "fc": "#2ca02c",
    "classify": "#d62728",
    "bbox_reg": "#9467bd",
    "nms": "#17becf",
}


def _stages(methods: Mapping[str, Any]) -> List[str]:
    seen = {k: None for m in methods.values() for k in m["stages"]}
    return [s for s in STAGE_ORDER if s in seen] + [s for s in seen if s not in STAGE_ORDER]


def _fmt_s(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    if x == 0:
        return "0"
    return f"{x:.3f}" if x >= 0.01 else f"{x:.2g}"


def _fmt_map(m: Mapping[str, Any]) -> str:
    v = m.get("mAP")
    if v is None:
        return "-"
    return f"{100 * float(v):.1f}"


def _mark(m: Mapping[str, Any]) -> str:
    return " *" if m.get("extrapolated") else ""


def _header(report: Mapping[str, Any]) -> List[str]:
    """The machine, the data and the protocol, in prose."""
    settings, machine = report.get("settings", {}), report.get("machine", {})
    proposals = settings.get("proposals", {})
    gpu = machine.get("gpu") or "none"
    windows = proposals.get("windows_per_image", [])
    lines = [
        "# SPP-net vs R-CNN: test time per image",
        "",
        f"Machine: {machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} cores, "
        f"{machine.get('torch_threads', '?')} torch threads), GPU: {gpu}, "
        f"torch {machine.get('torch', '?')}; device `{settings.get('device', '?')}`; CPU "
        f"window pooling: {machine.get('window_pooling', '?')}.",
        f"{settings.get('num_images', '?')} images of VOC{settings.get('year', '?')} "
        f"{settings.get('split', '?')}; backbone {settings.get('backbone', '?')} "
        f"({settings.get('backbone_weights', '?')} weights); selective search "
        f"{proposals.get('mode', '?')}, at most {proposals.get('max_proposals', '?')} windows "
        f"(got {', '.join(map(str, windows)) or '?'} per image); warm-up "
        f"{settings.get('warmup', '?')} pass(es) per method, methods interleaved per image.",
    ]
    load = (settings.get("load_average_before"), settings.get("load_average_after"))
    if load[0] is not None:
        lines.append(
            f"Load average before / after: {load[0]} / {load[1]} (a shared machine makes "
            "the times noisy)."
        )
    return lines


def _measured_table(methods: Mapping[str, Any], speedup: Mapping[str, float]) -> List[str]:
    """One row per method: stage medians, totals, R-CNN's time over the method's, mAP."""
    stages = _stages(methods)
    head = ["method", *stages, "total (no proposals)", "total + proposals",
            "R-CNN / method", "mAP (%)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for name, m in methods.items():
        row = [name + _mark(m)]
        row += [_fmt_s(m["stages"].get(s)) for s in stages]
        row += [_fmt_s(m["total"]), _fmt_s(m["total_with_proposals"])]
        row.append(
            f"{speedup[name]:.1f}x" if name in speedup else ("1x" if name == "rcnn" else "-")
        )
        row.append(_fmt_map(m))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def describe_test_options(opts: Mapping[str, Any]) -> str:
    """``variants.describe_method``'s ``test_options`` in words."""
    parts = []
    ranks = list(opts.get("svd_ranks") or [0, 0])
    if any(ranks):
        how = (
            "low rank from their responses"
            if opts.get("svd_method") == "responses"
            else "truncated SVD"
        )
        parts.append(f"fc6/fc7 {how} ranks {ranks[0]}/{ranks[1]}")
    if opts.get("fast_head") == "int8map":
        parts.append("fc6's first map in int8 on int8 pooled features, the rest of fc6/fc7 in bf16")
    elif opts.get("fast_head", "off") != "off":
        parts.append(f"fc6/fc7 in {opts['fast_head']}")
    if opts.get("fast_conv", "off") != "off":
        parts.append(f"conv in {opts['fast_conv']}")
    return ", ".join(parts) if parts else "float32 as trained"


def _notes(methods: Mapping[str, Any]) -> List[str]:
    """Footnotes: extrapolated stages and unmeasured accuracy."""
    notes = []
    for name, m in methods.items():
        opts = m.get("test_options")
        if opts:
            notes.append(f"{name}: {describe_test_options(opts)}.")
    if notes:
        notes.insert(0, "Test-time options per method:")
        notes.append("")
    for name, m in methods.items():
        if m.get("extrapolated"):
            scaled = ", ".join(m.get("extrapolated_stages", [])) or "per-window stages"
            notes.append(
                f"\\* {name}: {scaled} measured on the first {m.get('measured_windows')} "
                "distinct windows of each image and scaled linearly to the image's full count "
                "(extrapolated, not measured); the other stages ran on every window."
            )
        if m.get("mAP_note"):
            notes.append(f"{name}: mAP {m['mAP_note']}.")
    return [""] + notes if notes else []


def _shares(methods: Mapping[str, Any]) -> List[str]:
    """Each method's stages as shares of its summed stage medians (proposals excluded)."""
    lines = ["", "Where the time goes (share of the summed stage medians, proposals excluded):", ""]
    for name, m in methods.items():
        parts = sorted(
            ((s, v) for s, v in m["stages"].items() if s != "proposals"), key=lambda t: -t[1]
        )
        total = sum(v for _, v in parts) or 1.0
        share = ", ".join(f"{s} {100 * v / total:.0f}%" for s, v in parts if v / total >= 0.01)
        lines.append(f"- {name}: {share}")
    return lines


def _paper_tables() -> List[str]:
    lines = [
        "",
        "## The papers (GPU)",
        "",
        "SPP-net (TPAMI 2015, Table 10): VOC2007 test, ZF-5, one GPU, proposals excluded.",
        "",
        "| method | conv (s) | fc (s) | total (s) | R-CNN / method | mAP (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in PAPER_SPP_TABLE:
        lines.append(
            f"| {r['method']} | {r['conv']} | {r['fc']} | {r['total']} | {r['speedup']}x "
            f"| {r['mAP']} |"
        )
    lines += [
        "",
        "Fast R-CNN (ICCV 2015, Table 4): VGG16, VOC2007 test, test time per image "
        "(speed-ups computed from the times).",
        "",
        "| method | time (s) | R-CNN / method | mAP (%) |",
        "|---|---:|---:|---:|",
    ]
    base = PAPER_FAST_RCNN_TABLE[0]["time"]
    for r in PAPER_FAST_RCNN_TABLE:
        lines.append(f"| {r['method']} | {r['time']} | {base / r['time']:.0f}x | {r['mAP']} |")
    return lines


def format_speed_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: measured per-stage medians, speed-ups and mAP, each method's
    time shares, then the papers' tables for comparison."""
    methods, speedup = report["methods"], report.get("speedup", {})
    lines = _header(report)
    lines += ["", "## Measured: median seconds per image", ""]
    lines += _measured_table(methods, speedup)
    lines += _notes(methods) + _shares(methods) + _paper_tables()
    return "\n".join(lines) + "\n"


def _draw(
    ax,
    methods: Mapping[str, Any],
    names: Sequence[str],
    stages: Sequence[str],
    speedup: Mapping[str, float],
) -> None:
    y = list(range(len(names)))[::-1]
    for yi, name in zip(y, names):
        m = methods[name]
        left = 0.0
        for s in stages:
            v = float(m["stages"].get(s, 0.0))
            if v <= 0:
                continue
            ax.barh(
                yi, v, left=left, color=_STAGE_COLORS.get(s, "#7f7f7f"),
                hatch="//" if s in m.get("extrapolated_stages", ()) else None,
                edgecolor="white", linewidth=0.5,
            )  # fmt: skip
            left += v
        text = f" median total {m['total']:.3g} s"
        if name in speedup:
            text += f"  (R-CNN / this: {speedup[name]:.0f}x)"
        if m.get("extrapolated"):
            text += "  extrapolated"
        ax.text(left, yi, text, va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(list(names))
    ax.set_xlabel("seconds per image (bars: median of each stage)")
    ax.margins(x=0.35)


def plot_speed(report: Mapping[str, Any], path: PathLike) -> Path:
    """A stacked horizontal bar per method (stages in pipeline order, proposals excluded, so a
    bar's length is the method's cost given the windows), on a linear scale; with R-CNN and
    SPP-net both present, a second panel zooms on the SPP-net bars. Written atomically.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    methods = report["methods"]
    speedup = report.get("speedup", {})
    stages = [s for s in _stages(methods) if s != "proposals"]
    names = list(methods)
    spp = [n for n in names if n != "rcnn"]
    zoom = "rcnn" in methods and bool(spp)
    fig = Figure(figsize=(12, 2.0 + 0.6 * len(names) * (2 if zoom else 1)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if zoom else 1, 1, squeeze=False)[:, 0]
    _draw(axes[0], methods, names, stages, speedup)
    axes[0].set_title("all methods")
    if zoom:
        _draw(axes[1], methods, spp, stages, speedup)
        axes[1].set_title("SPP-net only (zoom)")
    handles = [Patch(color=_STAGE_COLORS.get(s, "#7f7f7f"), label=s) for s in stages]
    if any(m.get("extrapolated") for m in methods.values()):
        handles.append(
            Patch(
                facecolor="white",
                edgecolor="black",
                hatch="//",
                label="extrapolated from K windows",
            )
        )
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=1)
    machine, settings = report.get("machine", {}), report.get("settings", {})
    fig.suptitle(
        f"{settings.get('backbone', '?')} on {settings.get('device', '?')} "
        f"({machine.get('gpu') or machine.get('cpu', '?')}), "
        f"{settings.get('num_images', '?')} images, proposals excluded",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 0.86, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
