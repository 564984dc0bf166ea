"""Reports of an evaluation: precision-recall curves (one PNG) and a per-class AP table.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they work
on machines without a display and do not disturb an interactive session.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np

from ..utils import atomic_path

__all__ = ["format_ap_table", "plot_pr_curves"]

PathLike = Union[str, os.PathLike]


def plot_pr_curves(
    pr_curves,
    path: PathLike,
    ap: Optional[Mapping[str, float]] = None,
    title: Optional[str] = None,
) -> Path:
    """Draw every class's precision-recall curve on one set of axes, into one PNG.

    One axes with a legend (class and AP) rather than a panel per class: drawing 20 panels'
    ticks costs seconds on a small CPU, one axes a fraction of a second.

    Args:
        pr_curves: ``{class: {"recall": [D], "precision": [D]}}`` (``VOCEvaluator.pr_curves``),
            points in decreasing-score order, or an evaluated ``VOCEvaluator`` (its curves,
            and its AP and metric name when ``ap`` / ``title`` are not given). Classes without
            finite points (no ground truth or no detections) are listed without a curve.
        path: the PNG to write (atomically).
        ap: ``{class: AP}`` for the legend (NaN shown as n/a).
        title: figure title, e.g. "VOC2007 test, VOC07 11-point, mAP 0.7120".
    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if hasattr(pr_curves, "pr_curves"):  # an evaluator
        metrics = getattr(pr_curves, "metrics", None) or {}
        if ap is None:
            ap = metrics.get("AP")
        if title is None and metrics:
            title = f"{metrics['metric']}, mAP {metrics['mAP']:.4f}"
        pr_curves = pr_curves.pr_curves
    fig = Figure(figsize=(10, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.07, 0.09, 0.62, 0.82))
    colors = [f"C{k}" for k in range(10)]
    styles = ["-", "--", ":", "-."]
    for k, name in enumerate(pr_curves):
        rec = np.asarray(pr_curves[name]["recall"], dtype=np.float64)
        prec = np.asarray(pr_curves[name]["precision"], dtype=np.float64)
        ok = np.isfinite(rec) & np.isfinite(prec)
        value = None if ap is None else ap.get(name)
        label = name if value is None else f"{name}  {_fmt(value, 3)}"
        style = dict(color=colors[k % 10], ls=styles[(k // 10) % 4], lw=1.3, label=label)
        if ok.any():
            # Start at recall 0 with the first detection's precision.
            ax.plot(np.r_[0.0, rec[ok]], np.r_[prec[ok][0], prec[ok]], **style)
        else:
            ax.plot([], [], **style)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    if pr_curves:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                  title="class  AP" if ap is not None else None, title_fontsize=8)  # fmt: skip
    if title:
        ax.set_title(title, fontsize=11)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _fmt(v: Optional[float], digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def format_ap_table(metrics: Mapping, style: str = "plain", digits: int = 4) -> str:
    """Per-class AP table from a ``VOCEvaluator.evaluate`` dict.

    Args:
        metrics: needs ``"AP"`` and ``"mAP"``; ``"num_gt"`` (column "objects": non-difficult
            ground truth, the devkit's npos), ``"num_detections"``, ``"metric"``
            and ``"coco"`` (a dict from ``evaluate_coco``) are shown when present.
        style: "plain" (aligned columns) or "markdown".
    Returns:
        the table as text, the mAP on the last row (n/a for a class without ground truth).
    """
    if style not in ("plain", "markdown"):
        raise ValueError(f"style must be 'plain' or 'markdown', got {style!r}")
    aps: Dict[str, float] = dict(metrics["AP"])
    num_gt = metrics.get("num_gt") or {}
    num_det = metrics.get("num_detections") or {}
    header = ["class", "AP", "objects", "detections"]
    rows = [
        [name, _fmt(ap, digits), str(num_gt.get(name, "")), str(num_det.get(name, ""))]
        for name, ap in aps.items()
    ]
    metric = metrics.get("metric")
    rows.append([f"mAP ({metric})" if metric else "mAP", _fmt(metrics["mAP"], digits), "", ""])
    coco = metrics.get("coco")
    if coco:
        rows += [[f"COCO {k}", _fmt(v, digits), "", ""] for k, v in coco.items()]
    if style == "markdown":
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 3) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
    fmt_row = lambda r: "  ".join(  # noqa: E731
        (r[c].ljust(widths[c]) if c == 0 else r[c].rjust(widths[c])) for c in range(len(r))
    ).rstrip()
    rule = "-" * len(fmt_row(header))
    return "\n".join([fmt_row(header), rule] + [fmt_row(r) for r in rows[:len(aps)]] + [rule]
                     + [fmt_row(r) for r in rows[len(aps):]])  # fmt: skip
