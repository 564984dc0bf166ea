"""The scale report's analysis and files (issue 10): power-law fits of time, peak RSS and disk
against the dataset size N, extrapolation to VOC07, VOC12 and COCO, and ``scale.json``,
``scale.md`` and ``scale.png``. Running the sizes is ``benchmark/scale.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from spp_detect.utils import atomic_write_json, atomic_write_text

__all__ = [
    "STAGES",
    "TARGETS",
    "TARGET_CLASSES_OBJECTS",
    "FLAT_SLOPE",
    "fit_power_law",
    "cache_bytes",
    "analyse_sizes",
    "write_scale_report",
]

# Stages, and which N (training or test images) each grows with.
STAGES = ("proposals", "conv_cache", "finetune", "svm", "bbox_reg", "test")
_TEST_STAGES = ("test",)
# Dataset sizes to extrapolate to: (training images, test images). VOC12's test set (10,991
# images) and COCO's val2017 (5,000) stand for their test sets.
TARGETS = {
    "VOC07": (5011, 4952),
    "VOC12": (11540, 10991),
    "COCO train2017": (118287, 5000),
}
# Classes and training objects of each target (VOC07 and VOC12 trainval, COCO train2017's
# instances, as their devkits count them): the SVM positives (every training object's fc7)
# grow with the objects, the capped caches with the classes.
TARGET_CLASSES_OBJECTS = {
    "VOC07": (20, 12608),
    "VOC12": (20, 27450),
    "COCO train2017": (80, 860001),
}
# Peak RSS counts as flat in N when its log-log slope between the two largest sizes is below
# this (10x the images: < 26%).
FLAT_SLOPE = 0.1
# Stages whose peak holds the SVM/box-regression pass's caches (``cache_bytes``).
_CACHE_STAGES = ("svm", "bbox_reg")


def fit_power_law(ns: Sequence[float], ys: Sequence[float]) -> Optional[Dict[str, float]]:
    """Least-squares fit of ``log y = log a + b log N``; None with fewer than two positive
    points. Returns ``{"a", "slope"}``."""
    pts = [(n, y) for n, y in zip(ns, ys) if n > 0 and y > 0]
    if len({n for n, _ in pts}) < 2:
        return None
    x = np.log([n for n, _ in pts])
    y = np.log([v for _, v in pts])
    slope, intercept = np.polyfit(x, y, 1)
    return {"a": float(math.exp(intercept)), "slope": float(slope)}


def _predict(fit: Optional[Dict[str, float]], n: float) -> Optional[float]:
    return None if fit is None else fit["a"] * n ** fit["slope"]


def cache_bytes(caches: Dict[str, int], classes: Optional[int] = None, objects: int = 0) -> float:
    """Bytes of what the SVM and box-regression pass keeps: the positives' fc7 (one per
    training object, up to ``positives_cap_per_class`` per class), the hard-negative caches
    (float32 fc7) and the regression samples (float16 pooled features; in memory only for runs
    before they were spilled to disk, as ``caches["bbox_in_memory"]`` says). With ``classes``
    None: as a measured run held them at its end (``caches`` from ``scale.collect_size``);
    else their bound for a dataset of ``classes`` classes and ``objects`` training objects,
    every per-class cap full. None without caps."""
    neg = caches["negative_bytes"]
    box = caches["bbox_sample_bytes"] if caches.get("bbox_in_memory", True) else 0
    if classes is None:
        positives = caches.get("positives", caches["objects"])
        return (caches["negatives"] + positives) * neg + caches["bbox_samples"] * box
    if not caches["negatives_cap_per_class"] or (box and not caches["bbox_cap_per_class"]):
        return None
    pos_cap = caches.get("positives_cap_per_class", 0)
    positives = min(objects, classes * pos_cap) if pos_cap else objects
    return (classes * caches["negatives_cap_per_class"] + positives) * neg + (
        classes * caches["bbox_cap_per_class"] * box
    )


def _rss_at(sizes, fits, stage: str, n: int, target: str) -> Tuple[Optional[float], str]:
    """A stage's peak RSS at a target and how it was obtained: the largest run's peak plus
    the growth of the capped caches (SVM and regression stages), the largest run's peak (a
    stage flat between the two largest sizes), else the power law."""
    largest = sizes[-1]
    peak = float(largest["peak_rss_bytes"][stage])
    caches = largest.get("caches")
    if stage in _CACHE_STAGES and caches:
        bound = cache_bytes(caches, *TARGET_CLASSES_OBJECTS[target])
        if bound is not None:
            return peak + max(0.0, bound - cache_bytes(caches)), "caches"
    if _last_slope(sizes, stage) < FLAT_SLOPE:
        return peak, "flat"
    return _predict(fits["peak_rss_bytes"][stage], n), "power law"


def _last_slope(sizes: List[Dict[str, Any]], stage: str) -> float:
    """Peak RSS's log-log slope between the two largest sizes (inf when not measurable)."""
    key = "n_test" if stage in _TEST_STAGES else "n_train"
    a, b = sizes[-2], sizes[-1]
    fit = fit_power_law([a[key], b[key]], [a["peak_rss_bytes"][stage], b["peak_rss_bytes"][stage]])
    return math.inf if fit is None else fit["slope"]


def analyse_sizes(sizes: List[Dict[str, Any]]) -> Dict[str, Any]:
    sizes = sorted(sizes, key=lambda s: s["n_train"])
    fits: Dict[str, Dict[str, Any]] = {"seconds": {}, "peak_rss_bytes": {}, "disk_bytes": {}}
    for metric in fits:
        for stage in STAGES:
            key = "n_test" if stage in _TEST_STAGES else "n_train"
            ns = [s[key] for s in sizes]
            fits[metric][stage] = fit_power_law(ns, [s[metric][stage] for s in sizes])
    largest = sizes[-1]
    extrapolated: Dict[str, Dict[str, Any]] = {}
    for name, (n_train, n_test) in TARGETS.items():
        row: Dict[str, Any] = {"n_train": n_train, "n_test": n_test}

        def target(stage: str, n_train=n_train, n_test=n_test) -> Tuple[int, int]:
            test = stage in _TEST_STAGES
            return (n_test, largest["n_test"]) if test else (n_train, largest["n_train"])

        for metric in fits:
            row[metric + "_power_law"] = {
                stage: _predict(fits[metric][stage], target(stage)[0]) for stage in STAGES
            }
        # Time and disk are per image by design: the per-image rate of the largest run, which
        # small runs' fixed costs bias least. Peak RSS: see _rss_at.
        for metric in ("seconds", "disk_bytes"):
            row[metric] = {
                stage: largest[metric][stage] * target(stage)[0] / target(stage)[1]
                for stage in STAGES
            }
        rss = {stage: _rss_at(sizes, fits, stage, target(stage)[0], name) for stage in STAGES}
        row["peak_rss_bytes"] = {stage: v for stage, (v, _) in rss.items()}
        row["peak_rss_basis"] = {stage: how for stage, (_, how) in rss.items()}
        row["total_seconds"] = sum(row["seconds"].values())
        row["total_seconds_power_law"] = sum(v or 0.0 for v in row["seconds_power_law"].values())
        row["total_disk_bytes"] = sum(row["disk_bytes"].values())
        row["peak_rss_bytes_max"] = max(v or 0.0 for v in row["peak_rss_bytes"].values())
        extrapolated[name] = row
    last = {stage: _last_slope(sizes, stage) for stage in STAGES}
    flat = all(v < FLAT_SLOPE for v in last.values())
    return {
        "fits": fits,
        "extrapolated": extrapolated,
        "peak_rss_last_slopes": {k: (None if math.isinf(v) else v) for k, v in last.items()},
        "peak_rss_flat": flat,
    }


def _mb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 1e6:,.1f}"


def _sec(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 7200:
        return f"{v / 3600:,.1f} h"
    return f"{v:,.1f} s"


def _slope(f: Optional[Dict[str, float]]) -> str:
    return "-" if f is None else f"{f['slope']:.2f}"


def _markdown(report: Dict[str, Any]) -> str:
    lines = [
        "# Scale report",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}. Method {report['method']}, device {report['device']}, "
        f"weights {report['weights']}; images {report['image_size'][0]}-"
        f"{report['image_size'][1]} px (toy VOC generator); overrides: "
        f"`{' '.join(report['overrides']) or '(none)'}`.",
        "",
    ]
    lines += _measured_lines(report["sizes"])
    lines += _growth_lines(report)
    lines += _extrapolated_lines(report["extrapolated"])
    return "\n".join(lines)


def _measured_lines(sizes: List[Dict[str, Any]]) -> List[str]:
    lines = [
        "## Measured",
        "",
        "| N | stage | seconds | peak RSS (MB) | disk (MB) |",
        "|---:|---|---:|---:|---:|",
    ]
    for s in sizes:
        for stage in STAGES:
            lines.append(
                f"| {s['n_train']} | {stage} | {s['seconds'][stage]:.2f} | "
                f"{_mb(s['peak_rss_bytes'][stage])} | {_mb(s['disk_bytes'][stage])} |"
            )
    lines += [
        "",
        "Whole processes (exact peak, `getrusage`): "
        + "; ".join(
            f"N={s['n_train']}: train {_mb(s['train_max_rss_bytes'])} MB in "
            f"{s['train_wall_seconds']:.1f} s, test {_mb(s['test_max_rss_bytes'])} MB in "
            f"{s['test_wall_seconds']:.1f} s (mAP {s['mAP']:.3f})"
            for s in sizes
        )
        + ".",
        "",
    ]
    return lines


def _growth_lines(report: Dict[str, Any]) -> List[str]:
    sizes, fits = report["sizes"], report["fits"]
    last = report.get("peak_rss_last_slopes", {})
    pair = f"{sizes[-2]['n_train']} -> {sizes[-1]['n_train']}"
    lines = [
        "## Growth with N (log-log slope: 1 = linear, 0 = flat)",
        "",
        f"| stage | time | peak RSS | peak RSS, N = {pair} | disk |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        v = last.get(stage)
        lines.append(
            f"| {stage} | {_slope(fits['seconds'][stage])} | "
            f"{_slope(fits['peak_rss_bytes'][stage])} | {'-' if v is None else f'{v:.2f}'} | "
            f"{_slope(fits['disk_bytes'][stage])} |"
        )
    verdict = "flat" if report["peak_rss_flat"] else "NOT flat"
    cache = sizes[-1]["feature_cache"]
    lines += [
        "",
        f"Peak RSS is **{verdict}** in N (criterion: every stage's log-log slope between the "
        f"two largest sizes below {FLAT_SLOPE}). By design, training's in-memory pooled "
        f"windows grow with N up to the memory budget ({_mb(cache.get('memory_budget_bytes'))} "
        f"MB here; {_mb(cache.get('pooled_bytes'))} MB at N={sizes[-1]['n_train']}, "
        f"{'in memory' if cache.get('pooled_in_memory') else 'pooled from the conv cache'}) "
        "and are pooled from the on-disk conv cache beyond it; the SVM caches and regression "
        "samples grow up to their per-class caps.",
        "",
    ]
    lines += _cache_lines(sizes)
    return lines


def _cache_lines(sizes: List[Dict[str, Any]]) -> List[str]:
    rows = [s for s in sizes if s.get("caches")]
    if not rows:
        return []
    c = rows[-1]["caches"]
    lines = [
        "What the SVM and regression pass held at its end (positives: one fc7 per training "
        f"object, {c['negative_bytes']:,} B; hard negatives: cap {c['negatives_cap_per_class']:,}"
        f" per class, {c['negative_bytes']:,} B; regression samples: cap "
        f"{c['bbox_cap_per_class']:,} per class, {c['bbox_sample_bytes']:,} B, "
        f"{'in memory' if c.get('bbox_in_memory', True) else 'on disk, not counted in MB'}):",
        "",
        "| N | classes | objects | hard negatives | regression samples | MB in memory | "
        "regression caps full |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for s in rows:
        c = s["caches"]
        cap = c["classes"] * c["bbox_cap_per_class"]
        full = cap and c["bbox_samples"] >= cap
        lines.append(
            f"| {s['n_train']} | {c['classes']} | {c['objects']:,} | {c['negatives']:,} | "
            f"{c['bbox_samples']:,} | {_mb(cache_bytes(c))} | {'yes' if full else 'no'} |"
        )
    return lines + [""]


def _extrapolated_lines(extrapolated: Dict[str, Dict[str, Any]]) -> List[str]:
    lines = [
        "## Extrapolated to full datasets on this machine",
        "",
        "Time and disk: the per-image rate of the largest run times N (the pipeline is per "
        "image); the power-law total is given for comparison. Peak RSS: see below the table.",
        "",
        "| dataset | train / test images | proposals | conv cache | fine-tuning | SVMs | "
        "regression | testing | total time | total (power law) | peak RSS (MB) | disk (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in extrapolated.items():
        t = row["seconds"]
        lines.append(
            f"| {name} | {row['n_train']:,} / {row['n_test']:,} | "
            + " | ".join(_sec(t[s]) for s in STAGES)
            + f" | {_sec(row['total_seconds'])} | {_sec(row['total_seconds_power_law'])} | "
            f"{_mb(row['peak_rss_bytes_max'])} | {_mb(row['total_disk_bytes'])} |"
        )
    lines += [
        "",
        "Fine-tuning ran the short configuration's iterations per image; at the paper's "
        "300k iterations on VOC07 (~60 per image) it is that many times longer. Peak RSS per "
        "stage sums the process tree (proposal workers included) over the stage's clock "
        "interval in `train_log.json`. SVMs and regression share one pass over the images; "
        "regression's time is the time spent sampling and fitting it, and its disk is inside "
        "`model.pt` (counted under svm).",
        "",
        "Peak RSS at a dataset, per stage: for the SVM and regression stages, the largest "
        "run's peak plus the growth of what the pass keeps (`cache_bytes`: every class's caps "
        "full, one fc7 per training object; classes and objects: "
        + ", ".join(f"{k} {c} / {o:,}" for k, (c, o) in TARGET_CLASSES_OBJECTS.items())
        + "); for a stage flat between the two largest sizes, the largest run's peak; "
        "otherwise the power law. Per stage here: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{st} {how}" for st, how in row["peak_rss_basis"].items())
            for name, row in extrapolated.items()
            if "peak_rss_basis" in row
        )
        + ".",
        "",
    ]
    return lines


def _plot(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, fits = report["sizes"], report["fits"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    titles = {"seconds": "time (s)", "peak_rss_bytes": "peak RSS (bytes)", "disk_bytes": "disk"}
    for ax, metric in zip(axes, titles):
        for stage in STAGES:
            key = "n_test" if stage in _TEST_STAGES else "n_train"
            ns = np.array([s[key] for s in sizes], dtype=float)
            ys = np.array([s[metric][stage] for s in sizes], dtype=float)
            if not (ys > 0).any():
                continue
            (line,) = ax.plot(ns[ys > 0], ys[ys > 0], "o", label=stage)
            fit = fits[metric][stage]
            if fit is not None:
                grid = np.geomspace(ns.min(), max(TARGETS["VOC07"]), 50)
                ax.plot(grid, fit["a"] * grid ** fit["slope"], "--", color=line.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("images N")
        ax.set_title(titles[metric] + " (dashed: fit to VOC07)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_scale_report(report: Dict[str, Any], output: Path) -> None:
    """``scale.json``, ``scale.md`` and ``scale.png`` of ``report`` into the folder ``output``."""
    output = Path(output)
    atomic_write_json(output / "scale.json", report)
    atomic_write_text(output / "scale.md", _markdown(report))
    _plot(report, output / "scale.png")
