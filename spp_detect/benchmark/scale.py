"""How training and testing grow with the dataset (issue 10): a scale report.

For each size N, a VOC-like toy set of N training and N test images (``make_toy_voc``, VOC's
500 x 375 by default) is trained and tested on, each in a child process so its memory is its
own. Per stage (proposals, conv cache, fine-tuning, SVMs, box regression, testing) the report
records wall time (``train_log.json``'s seconds; SVMs and regression share one pass over the
images, split by the time spent in regression), peak RSS and disk (the cache folders and the
stage's outputs), fits ``y = a N^b`` by least squares on log-log axes, and extrapolates to VOC07,
VOC12 and COCO train2017 on this machine.

Peak RSS: a 20 ms sampler in the child sums the RSS of its process tree (proposal workers
included, so pages shared with them count twice: an upper bound), and stage windows are laid
end to end from the end of training by ``train_log.json``'s stage seconds (the untimed gaps,
building the detector and saving the model, are milliseconds); the process's exact peak
(``getrusage``) is recorded too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from spp_detect.errors import UserInputError
from spp_detect.utils import atomic_write_json, atomic_write_text

__all__ = [
    "STAGES",
    "TARGETS",
    "DEFAULT_OVERRIDES",
    "run_scale_report",
    "fit_power_law",
    "folder_bytes",
]

logger = logging.getLogger(__name__)

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
# The short configuration of a scale run (the rest are the package defaults): the paper's
# ~60 fine-tuning iterations per image would make the 1,000-image run last hours; two per image
# keep fine-tuning linear in N, so its slope (not its absolute time) carries over.
DEFAULT_OVERRIDES = ("finetune.iters_per_image=2",)
# Peak RSS counts as flat in N when its log-log slope is below this (10x the images: < 26%).
FLAT_SLOPE = 0.1
_SAMPLE_SECONDS = 0.02


# -- measurements --------------------------------------------------------------------------------


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size; missing: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tree_rss(pid: int) -> int:
    """Bytes of RSS of process ``pid`` and its descendants (Linux /proc; 0 if gone)."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm", encoding="ascii") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


class _RSSSampler:
    """Samples this process tree's RSS every ``_SAMPLE_SECONDS`` in a thread."""

    def __init__(self) -> None:
        self.samples: List[Tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _tree_rss(pid)))
            self._stop.wait(_SAMPLE_SECONDS)

    def __enter__(self) -> "_RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float = -math.inf, end: float = math.inf) -> int:
        inside = [r for t, r in self.samples if start <= t <= end]
        return max(inside) if inside else 0


def _stage_seconds(log: Dict[str, Any]) -> Dict[str, float]:
    """Training stage times from ``train_log.json`` (distillation counts as fine-tuning)."""
    s = log["seconds"]
    svm_bbox = float(s.get("svm_bbox", 0.0))
    bbox = min(float(log.get("classifiers", {}).get("bbox_reg_seconds", 0.0)), svm_bbox)
    return {
        "proposals": float(s.get("proposals", 0.0)),
        "conv_cache": float(s.get("features", 0.0)),
        "finetune": float(s.get("finetune", 0.0)),  # includes distill when it runs
        "svm": svm_bbox - bbox,
        "bbox_reg": bbox,
    }


def _worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One child's job: train or test on one size, with RSS sampled."""
    from spp_detect.config import load_config
    from spp_detect.datasets.toy_voc import TOY_CLASSES
    from spp_detect.datasets.voc import VOCDataset

    config = load_config(spec.get("config"), spec["overrides"])
    out = Path(spec["output"])
    weights = spec["weights"]
    pretrained = {"imagenet": True, "none": False}.get(weights, weights)
    result: Dict[str, Any] = {}
    with _RSSSampler() as rss:
        t0 = time.perf_counter()
        if spec["job"] == "train":
            from spp_detect.training.train import train_detector

            dataset = VOCDataset(spec["voc_root"], "2007", "trainval", TOY_CLASSES)
            log = train_detector(
                dataset, out / "train", config, method=spec["method"], device=spec["device"],
                pretrained=pretrained, cache_dir=out / "cache",
            )  # fmt: skip
            t1 = time.perf_counter()
            seconds = _stage_seconds(log)
            end, peaks = t1, {}
            for stage in reversed(STAGES[:-1]):  # laid end to end from the end of training
                start = end - seconds[stage]
                peaks[stage] = rss.peak(start if stage != "proposals" else t0, end)
                end = start
            result = {"seconds": seconds, "peak_rss": peaks, "log": log}
        else:
            from spp_detect.inference.dataset import test_detector

            dataset = VOCDataset(spec["voc_root"], "2007", "test", TOY_CLASSES)
            metrics = test_detector(
                out / "train" / "model.pt", dataset, out / "test", device=spec["device"],
                cache_dir=out / "test_cache",
            )  # fmt: skip
            t1 = time.perf_counter()
            result = {
                "seconds": {"test": t1 - t0},
                "peak_rss": {"test": rss.peak()},
                "mAP": float(metrics.get("mAP", float("nan"))),
            }
    result["wall_seconds"] = t1 - t0
    result["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def _run_child(spec: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    """Run ``_worker(spec)`` in a fresh Python process; returns its result."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / f"{spec['job']}_spec.json"
    result_path = folder / f"{spec['job']}_result.json"
    atomic_write_json(spec_path, spec)
    cmd = [sys.executable, "-m", "spp_detect.benchmark.scale", str(spec_path), str(result_path)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate()
    except BaseException:  # interrupted: the child goes too
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"scale report: {spec['job']} of {folder} failed:\n{tail}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["process_seconds"] = time.perf_counter() - t
    return result


def measure_size(
    n: int,
    output: Path,
    overrides: Sequence[str],
    config: Optional[str] = None,
    method: str = "spp",
    device: str = "cpu",
    weights: str = "imagenet",
    image_size: Tuple[int, int] = (375, 500),
    seed: int = 0,
) -> Dict[str, Any]:
    """Generate, train and test on N images; returns the size's measurements."""
    from spp_detect.datasets.toy_voc import make_toy_voc

    folder = Path(output) / f"n{n}"
    for sub in ("cache", "train", "test", "test_cache"):  # measure from scratch
        shutil.rmtree(folder / sub, ignore_errors=True)
    t = time.perf_counter()
    root = make_toy_voc(
        folder / "data", num_train=n, num_val=0, num_test=n, seed=seed,
        image_size=image_size, overwrite=True,
    )  # fmt: skip
    generate = time.perf_counter() - t
    spec = dict(
        voc_root=str(root), output=str(folder), overrides=list(overrides), config=config,
        method=method, device=device, weights=weights,
    )  # fmt: skip
    logger.info("scale report: N=%d: training", n)
    train = _run_child(dict(spec, job="train"), folder)
    logger.info("scale report: N=%d: testing", n)
    test = _run_child(dict(spec, job="test"), folder)
    cache = folder / "cache"
    train_dir = folder / "train"
    feature_dir = cache / ("conv_features" if method == "spp" else "rcnn_features")
    disk = {
        "proposals": folder_bytes(cache / "proposals"),
        "conv_cache": folder_bytes(feature_dir),
        "finetune": folder_bytes(train_dir / "finetune.pt"),
        # The SVMs and regressors are saved inside model.pt with the head and backbone.
        "svm": folder_bytes(train_dir / "model.pt"),
        "bbox_reg": 0,
        "test": folder_bytes(folder / "test") + folder_bytes(folder / "test_cache"),
    }
    seconds = dict(train["seconds"], **test["seconds"])
    peak = dict(train["peak_rss"], **test["peak_rss"])
    return {
        "n_train": n,
        "n_test": n,
        "generate_seconds": generate,
        "seconds": {s: seconds[s] for s in STAGES},
        "peak_rss_bytes": {s: int(peak[s]) for s in STAGES},
        "disk_bytes": disk,
        "train_max_rss_bytes": int(train["max_rss"]),
        "test_max_rss_bytes": int(test["max_rss"]),
        "train_wall_seconds": train["wall_seconds"],
        "test_wall_seconds": test["wall_seconds"],
        "finetune_iterations": _iterations(train["log"]),
        # In-memory pooled windows grow with N up to the memory budget, then stay on disk.
        "feature_cache": {
            k: train["log"].get("feature_cache", {}).get(k)
            for k in ("pooled_in_memory", "pooled_bytes", "memory_budget_bytes")
        },
        "proposals_per_image": train["log"].get("proposals_per_image"),
        "mAP": test["mAP"],
    }


def _iterations(log: Dict[str, Any]) -> Optional[int]:
    entries = log.get("finetune") or []
    return int(entries[-1]["iteration"]) if entries and "iteration" in entries[-1] else None


# -- fits and the report ---------------------------------------------------------------------


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


def _analyse(sizes: List[Dict[str, Any]]) -> Dict[str, Any]:
    fits: Dict[str, Dict[str, Any]] = {"seconds": {}, "peak_rss_bytes": {}, "disk_bytes": {}}
    for metric in fits:
        for stage in STAGES:
            key = "n_test" if stage in _TEST_STAGES else "n_train"
            ns = [s[key] for s in sizes]
            fits[metric][stage] = fit_power_law(ns, [s[metric][stage] for s in sizes])
    largest = max(sizes, key=lambda s: s["n_train"])
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
        # small runs' fixed costs bias least. Peak RSS: the power law.
        for metric in ("seconds", "disk_bytes"):
            row[metric] = {
                stage: largest[metric][stage] * target(stage)[0] / target(stage)[1]
                for stage in STAGES
            }
        row["peak_rss_bytes"] = row["peak_rss_bytes_power_law"]
        row["total_seconds"] = sum(row["seconds"].values())
        row["total_seconds_power_law"] = sum(v or 0.0 for v in row["seconds_power_law"].values())
        row["total_disk_bytes"] = sum(row["disk_bytes"].values())
        row["peak_rss_bytes_max"] = max(v or 0.0 for v in row["peak_rss_bytes"].values())
        extrapolated[name] = row
    rss_slopes = {s: (f or {}).get("slope") for s, f in fits["peak_rss_bytes"].items()}
    flat = all(v is not None and v < FLAT_SLOPE for v in rss_slopes.values())
    return {"fits": fits, "extrapolated": extrapolated, "peak_rss_flat": flat}


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
    sizes, fits = report["sizes"], report["fits"]
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
        "## Growth with N (log-log slope: 1 = linear, 0 = flat)",
        "",
        "| stage | time | peak RSS | disk |",
        "|---|---:|---:|---:|",
    ]
    for stage in STAGES:
        lines.append(
            f"| {stage} | {_slope(fits['seconds'][stage])} | "
            f"{_slope(fits['peak_rss_bytes'][stage])} | {_slope(fits['disk_bytes'][stage])} |"
        )
    verdict = "flat" if report["peak_rss_flat"] else "NOT flat"
    cache = sizes[-1]["feature_cache"]
    lines += [
        "",
        f"Peak RSS is **{verdict}** in N (criterion: every stage's log-log slope below "
        f"{FLAT_SLOPE}). By design, training's in-memory pooled windows grow with N up to the "
        f"memory budget ({_mb(cache.get('memory_budget_bytes'))} MB here; "
        f"{_mb(cache.get('pooled_bytes'))} MB at N={sizes[-1]['n_train']}, "
        f"{'in memory' if cache.get('pooled_in_memory') else 'pooled from the conv cache'}) "
        "and are pooled from the on-disk conv cache beyond it; the SVM caches and regression "
        "samples grow up to their per-class caps.",
        "",
        "## Extrapolated to full datasets on this machine",
        "",
        "Time and disk: the per-image rate of the largest run times N (the pipeline is per "
        "image); the power-law total is given for comparison. Peak RSS: the power-law fit.",
        "",
        "| dataset | train / test images | proposals | conv cache | fine-tuning | SVMs | "
        "regression | testing | total time | total (power law) | peak RSS (MB) | disk (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["extrapolated"].items():
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
        "stage sums the process tree (proposal workers included) and is aligned on the stage "
        "seconds of `train_log.json`. SVMs and regression share one pass over the images; "
        "regression's time is the time spent sampling and fitting it, and its disk is inside "
        "`model.pt` (counted under svm).",
        "",
    ]
    return "\n".join(lines)


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


def run_scale_report(
    sizes: Sequence[int],
    output: Path,
    overrides: Sequence[str] = DEFAULT_OVERRIDES,
    config: Optional[str] = None,
    method: str = "spp",
    device: str = "cpu",
    weights: str = "imagenet",
    image_size: Tuple[int, int] = (375, 500),
    command: str = "",
) -> Dict[str, Any]:
    """Measure every size, fit, extrapolate; writes ``scale.json``, ``scale.md`` and
    ``scale.png`` into ``output`` and returns the report."""
    from spp_detect.benchmark.machine import machine_info

    if len(sizes) < 2 or len(set(sizes)) != len(sizes) or min(sizes) < 1:
        raise UserInputError(f"--sizes: need two or more different positive sizes, got {sizes}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    measured = [
        measure_size(n, output, overrides, config, method, device, weights, image_size)
        for n in sorted(sizes)
    ]
    report: Dict[str, Any] = {
        "command": command,
        "machine": _machine_line(machine_info),
        "method": method,
        "device": device,
        "weights": weights,
        "image_size": list(image_size),
        "overrides": list(overrides),
        "config": config,
        "stages": list(STAGES),
        "targets": {k: list(v) for k, v in TARGETS.items()},
        "sizes": measured,
    }
    report.update(_analyse(measured))
    atomic_write_json(output / "scale.json", report)
    atomic_write_text(output / "scale.md", _markdown(report))
    _plot(report, output / "scale.png")
    return report


def _machine_line(machine_info) -> str:
    info = machine_info()
    parts = [str(info.get("cpu")), f"{info.get('cpu_count')} CPUs"]
    parts.append(f"{info.get('torch_threads')} torch threads")
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    if info.get("load_average"):
        parts.append("load average " + " ".join(f"{v:.1f}" for v in info["load_average"]))
    return ", ".join(parts)


if __name__ == "__main__":  # the child process of _run_child
    logging.basicConfig(level=logging.WARNING)
    _spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    atomic_write_json(Path(sys.argv[2]), _worker(_spec))
