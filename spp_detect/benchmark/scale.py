"""How training and testing grow with the dataset (issue 10): running the sizes of a scale report.

For each size N, a VOC-like toy set of N training and N test images (``make_toy_voc``, VOC's
500 x 375 by default) is trained and tested on, each in a child process so its memory is its
own. Per stage (proposals, conv cache, fine-tuning, SVMs, box regression, testing) the report
records wall time (``train_log.json``'s seconds; SVMs and regression share one pass over the
images, split by the time spent in regression), peak RSS and disk (the cache folders and the
stage's outputs), fits ``y = a N^b`` by least squares on log-log axes, and extrapolates to VOC07,
VOC12 and COCO train2017 on this machine.

Peak RSS: a 20 ms sampler in the child (``resources.RSSSampler``) sums the RSS of its process
tree (proposal workers included, so pages shared with them count twice: an upper bound), and
each stage's peak is taken over the stage's clock interval that ``train_log.json`` records
(``train._timed``; SVMs and regression share the pass's peak, up to the end of training); the
process's exact peak (``getrusage``) and the RSS timeline (one value per second) are recorded
too. The child fixes glibc's mmap threshold as the command-line tools do
(``utils.limit_heap_growth``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from spp_detect.benchmark.resources import RSSSampler, folder_bytes
from spp_detect.benchmark.scale_report import STAGES, TARGETS, analyse_sizes, write_scale_report
from spp_detect.errors import UserInputError
from spp_detect.utils import atomic_write_json

__all__ = ["DEFAULT_OVERRIDES", "run_scale_report", "collect_size", "pass_caches"]

logger = logging.getLogger(__name__)

# The short configuration of a scale run (the rest are the package defaults): the paper's
# ~60 fine-tuning iterations per image would make the 1,000-image run last hours; two per image
# keep fine-tuning linear in N, so its slope (not its absolute time) carries over.
DEFAULT_OVERRIDES = ("finetune.iters_per_image=2",)


def _stage_seconds(log: Dict[str, Any]) -> Dict[str, float]:
    """Training stage times from ``train_log.json`` (distillation counts as fine-tuning, the
    fc response statistics measured after the SVMs as the SVM stage)."""
    s = log["seconds"]
    svm_bbox = float(s.get("svm_bbox", 0.0))
    bbox = min(float(log.get("classifiers", {}).get("bbox_reg_seconds", 0.0)), svm_bbox)
    return {
        "proposals": float(s.get("proposals", 0.0)),
        "conv_cache": float(s.get("features", 0.0)),
        "finetune": float(s.get("finetune", 0.0)),  # includes distill when it runs
        "svm": svm_bbox - bbox + float(s.get("head_stats", 0.0)),
        "bbox_reg": bbox,
    }


def _stage_peaks(rss: "RSSSampler", log: Dict[str, Any], t0: float, t1: float) -> Dict[str, int]:
    """Peak RSS of each training stage over its clock interval in ``log`` (``train._timed``).
    SVMs and regression share one pass over the images: both get the pass's peak, up to the
    end of training (response statistics and saving included). A log without intervals (an
    older run) gets the stages laid end to end back from ``t1``."""
    clock = log.get("clock") or {}
    if all(k in clock for k in ("proposals", "features", "finetune", "svm_bbox")):
        svm = rss.peak(clock["svm_bbox"][0], t1)
        return {
            "proposals": rss.peak(t0, clock["proposals"][1]),
            "conv_cache": rss.peak(*clock["features"]),
            "finetune": rss.peak(*clock["finetune"]),
            "svm": svm,
            "bbox_reg": svm,
        }
    seconds, end, peaks = _stage_seconds(log), t1, {}
    for stage in reversed(STAGES[:-1]):
        start = end - seconds[stage]
        peaks[stage] = rss.peak(start if stage != "proposals" else t0, end)
        end = start
    return peaks


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
    with RSSSampler() as rss:
        t0 = time.perf_counter()
        if spec["job"] == "train":
            from spp_detect.training.train import train_detector

            dataset = VOCDataset(spec["voc_root"], "2007", "trainval", TOY_CLASSES)
            log = train_detector(
                dataset, out / "train", config, method=spec["method"], device=spec["device"],
                pretrained=pretrained, cache_dir=out / "cache",
            )  # fmt: skip
            t1 = time.perf_counter()
            peaks = _stage_peaks(rss, log, t0, t1)
            result = {"seconds": _stage_seconds(log), "peak_rss": peaks, "log": log}
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
    result["rss_timeline"] = rss.timeline(t0)
    if spec["job"] == "train":  # the stages on the same time axis
        result["clock"] = {k: [a - t0, b - t0] for k, (a, b) in log.get("clock", {}).items()}
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
    done = _finished_size(folder, n, overrides, config, method, device, weights, image_size, seed)
    if done is not None:
        logger.info("scale report: N=%d: measured before (%s), reused", n, folder / _MEASURED)
        return done
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
    measured = collect_size(folder, n, train, test, generate, method)
    key = _size_key(n, overrides, config, method, device, weights, image_size, seed)
    atomic_write_json(folder / _MEASURED, {"key": key, "measured": measured})
    return measured


# One size's measurements, kept so that a rerun of the report (after an interruption, or with
# more sizes) reuses the sizes already measured with the same settings.
_MEASURED = "measured.json"


def _size_key(n, overrides, config, method, device, weights, image_size, seed) -> Dict[str, Any]:
    return dict(
        n=n, overrides=list(overrides), config=config, method=method, device=device,
        weights=weights, image_size=list(image_size), seed=seed,
    )  # fmt: skip


def _finished_size(folder: Path, n, overrides, config, method, device, weights, image_size, seed):
    path = folder / _MEASURED
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    key = _size_key(n, overrides, config, method, device, weights, image_size, seed)
    return saved.get("measured") if saved.get("key") == key else None


def collect_size(
    folder: Path, n: int, train: Dict[str, Any], test: Dict[str, Any], generate, method: str
) -> Dict[str, Any]:
    """One size's measurements from its training and test jobs' results and its folders."""
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
        "caches": pass_caches(train_dir / "model.pt", folder / "data", train["log"]),
        "mAP": test["mAP"],
    }


def pass_caches(model_path: Path, voc_root: Path, log: Dict[str, Any]) -> Dict[str, int]:
    """What the SVM and box-regression pass kept at its end and its caps, for
    ``scale_report.cache_bytes``: counts from ``train_log.json``, caps and feature sizes from
    ``model.pt`` (fc7: ``hidden`` float32; regression: fc6's input, float16), training objects
    from the annotations."""
    from spp_detect.datasets.toy_voc import TOY_CLASSES
    from spp_detect.datasets.voc import VOCDataset
    from spp_detect.serialization import load_file

    model = load_file(model_path, "model")
    hidden, pooled_dim = model["head"]["fc6.weight"].shape
    cfg, done = model["config"], log.get("classifiers", {})
    dataset = VOCDataset(voc_root, "2007", "trainval", TOY_CLASSES)
    per_class: Dict[int, int] = {}
    for i in range(len(dataset)):
        for c in dataset[i].labels.tolist():
            per_class[c] = per_class.get(c, 0) + 1
    pos_cap = int(cfg["svm"].get("max_positives", 0))
    return {
        "classes": len(model["class_names"]),
        "objects": sum(per_class.values()),
        # SVM positives: every object, or svm.max_positives per class (training.svm_bbox).
        "positives": sum(min(n, pos_cap) if pos_cap else n for n in per_class.values()),
        "positives_cap_per_class": pos_cap,
        "negatives": int(sum(done.get("svm_cache_sizes") or [])),
        "negatives_cap_per_class": int(cfg["svm"]["max_cached_negatives"]),
        "negative_bytes": int(hidden) * 4,
        "bbox_samples": int(done.get("bbox_samples", 0)),
        "bbox_cap_per_class": int(cfg["bbox_reg"]["max_samples"]),
        "bbox_sample_bytes": int(pooled_dim) * 2,
        # Spilled to disk (sample_store.RowStore) since the pass checkpoints itself.
        "bbox_in_memory": bool(done.get("bbox_in_memory", True)),
    }


def _iterations(log: Dict[str, Any]) -> Optional[int]:
    entries = log.get("finetune") or []
    return int(entries[-1]["iteration"]) if entries and "iteration" in entries[-1] else None


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
    ``scale.png`` into ``output`` (again after each size from the second on, so an
    interrupted run leaves a report of what it measured) and returns the report. A size
    measured before in ``output`` with the same settings is reused (``n<N>/measured.json``)."""
    if len(sizes) < 2 or len(set(sizes)) != len(sizes) or min(sizes) < 1:
        raise UserInputError(f"--sizes: need two or more different positive sizes, got {sizes}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    measured: List[Dict[str, Any]] = []
    for n in sorted(sizes):
        measured.append(
            measure_size(n, output, overrides, config, method, device, weights, image_size)
        )
        if len(measured) >= 2:  # a partial report as soon as there is something to fit
            report = _report(measured, sizes, command, method, device, weights, image_size,
                             overrides, config)  # fmt: skip
            write_scale_report(report, output)
    return report


def _report(measured, sizes, command, method, device, weights, image_size, overrides, config):
    from spp_detect.benchmark.machine import machine_info

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
        # Sizes asked for but not measured yet (an interrupted or unfinished run).
        "sizes_missing": sorted(set(sizes) - {m["n_train"] for m in measured}),
    }
    report.update(analyse_sizes(measured))
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
    from spp_detect.utils import limit_heap_growth

    logging.basicConfig(level=logging.WARNING)
    # As every CLI entry point (cli_common.run_user_command) does, so that the measured
    # process is the one users run; THP_MEM_ALLOC_ENABLE comes from the parent's environment.
    limit_heap_growth()
    _spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    atomic_write_json(Path(sys.argv[2]), _worker(_spec))
