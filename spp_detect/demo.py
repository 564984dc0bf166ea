"""The whole pipeline on a generated dataset, with no set-up: the library behind
``spp-detect demo``.

Stages (each logged as it starts, each reusing what an earlier run of the same folder left):

1. a toy VOC dataset (``datasets.toy_voc``: shapes on clutter, VOC layout);
2. selective search proposals for its train and test images (cached);
3. SPP-net training with the ImageNet-pretrained EfficientNet-Lite0 backbone
   (``configs/toy.yaml``: fine-tuning of fc6/fc7/fc8, SVMs, box regression; sec. 4.1);
4. VOC07 evaluation on the test split (11-point AP per class);
5. ``detect`` over the test images, with annotated copies;
6. a short speed comparison with R-CNN on the same images and windows
   (``benchmark.speed_report``; R-CNN timed on its first windows and extrapolated, so that it
   takes seconds, not minutes).

Everything goes under one folder; ``demo_summary.json`` lists where.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

from spp_detect.errors import UserInputError
from spp_detect.utils import atomic_write_json

__all__ = [
    "TOY_CONFIG",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "QUICK_OVERRIDES",
    "run_demo",
    "format_demo_report",
]

logger = logging.getLogger(__name__)

# The package's own toy configuration (spp_detect/configs/toy.yaml).
TOY_CONFIG = Path(__file__).resolve().parent / "configs" / "toy.yaml"

# --quick: a smoke run (a fraction of the default's time), not a meaningful mAP.
QUICK_OVERRIDES = ("proposals.max_proposals=500", "finetune.iterations=100")
# (train, test) images: the default, and --quick's (each split still holds all 6 classes).
DEFAULT_SIZES = (40, 20)
QUICK_SIZES = (16, 8)

_NUM_STAGES = 6


@contextmanager
def _stage(seconds: Dict[str, float], key: str, k: int, text: str) -> Iterator[None]:
    """Log stage ``k`` as it starts and record its wall time in ``seconds[key]``."""
    logger.info("[demo %d/%d] %s", k, _NUM_STAGES, text)
    t = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - t


def _toy_dataset(root: Path, num_train: int, num_test: int, seed: int) -> Path:
    """The toy dataset at ``root``: reused when an earlier run wrote it with the same
    arguments, (re)generated otherwise."""
    from spp_detect.datasets.toy_voc import make_toy_voc

    meta_path = root / "VOC2007" / "toy_voc.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        wanted = {"seed": seed, "num_train": num_train, "num_val": 0, "num_test": num_test}
        if all(meta.get(k) == v for k, v in wanted.items()):
            logger.info("reusing the toy dataset in %s", root)
            return root
    return make_toy_voc(
        root, num_train=num_train, num_val=0, num_test=num_test, seed=seed, overwrite=True
    )


def _check_args(
    output_dir: Union[str, Path],
    num_train: Optional[int],
    num_test: Optional[int],
    quick: bool,
    bench_images: int,
    rcnn_max_windows: int,
) -> Tuple[Path, int, int]:
    """The output folder and the image counts, or a ``UserInputError`` naming the argument."""
    sizes = QUICK_SIZES if quick else DEFAULT_SIZES
    num_train = sizes[0] if num_train is None else num_train
    num_test = sizes[1] if num_test is None else num_test
    if num_train < 1 or num_test < 1:
        raise UserInputError(
            f"--num-train and --num-test must be >= 1, got {num_train}, {num_test}"
        )
    if bench_images < 0 or rcnn_max_windows < 0:
        raise UserInputError("--bench-images and --rcnn-max-windows must be >= 0")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out}: exists and is not a folder")
    return out, num_train, num_test


def _data_stages(
    out: Path, config, num_train: int, num_test: int, seed: int, seconds: Dict[str, float]
) -> Tuple[Any, Any, Dict[str, Any]]:
    """Stages 1 and 2: the toy dataset (train and test ``VOCDataset``) and its proposals;
    returns the test split's proposals too."""
    from spp_detect.datasets.voc import VOCDataset
    from spp_detect.inference.dataset import dataset_proposals

    data_root, cache_dir = out / "data", out / "cache"
    text = f"generating the toy VOC dataset ({num_train} train, {num_test} test images)"
    with _stage(seconds, "dataset", 1, text):
        _toy_dataset(data_root, num_train, num_test, seed)
        train_set = VOCDataset(data_root, year="2007", split="train")
        test_set = VOCDataset(
            data_root, year="2007", split="test", class_names=train_set.class_names
        )
    p = config.proposals
    text = (
        f"selective search proposals ({p.mode}, up to {p.max_proposals} per image, "
        f"{config.workers} jobs)"
    )
    with _stage(seconds, "proposals", 2, text):
        dataset_proposals(train_set, config, cache_dir)
        test_proposals = dataset_proposals(test_set, config, cache_dir)
    return train_set, test_set, test_proposals


def _model_stages(
    out: Path,
    config,
    device: Optional[str],
    data: Tuple[Any, Any, Dict[str, Any]],
    score_thresh: float,
    seconds: Dict[str, float],
) -> Tuple[Path, Dict[str, Any], Dict[str, Any]]:
    """Stages 3 to 5 on ``data`` = (train set, test set, test proposals): train SPP-net,
    evaluate it and detect on the test images -> (model path, metrics, detect summary)."""
    from spp_detect.inference.dataset import test_detector
    from spp_detect.inference.folder import detect_folder
    from spp_detect.training.train import train_detector

    train_set, test_set, test_proposals = data
    cache_dir = out / "cache"
    m = config.model
    text = f"training SPP-net ({m.backbone}, scales {list(m.scales)}, fc {m.hidden}): " + (
        "fine-tuning, SVMs, box regression"
    )
    with _stage(seconds, "train", 3, text):
        train_log = train_detector(
            train_set, out / "model", config, method="spp", device=device, pretrained=True,
            cache_dir=cache_dir,
        )  # fmt: skip
        model_path = Path(train_log["model"])
    text = f"evaluating on the {len(test_set)} test images (VOC07 11-point AP)"
    with _stage(seconds, "eval", 4, text):
        metrics = test_detector(
            model_path, test_set, out / "eval", device=device, cache_dir=cache_dir,
            use_07_metric=True,
        )  # fmt: skip
    with _stage(seconds, "detect", 5, "detect on the test images (annotated copies)"):
        det_summary = detect_folder(
            model_path, [r.path for r in test_set.records], out / "detections",
            score_thresh=score_thresh, device=device, jobs=max(1, config.workers),
            exist_ok=True, proposals=test_proposals,
        )  # fmt: skip
    return model_path, metrics, det_summary


def _speed_stage(
    out: Path,
    config,
    model_path: Path,
    device: Optional[str],
    bench_images: int,
    rcnn_max_windows: int,
    seconds: Dict[str, float],
) -> Optional[Dict[str, Any]]:
    """Stage 6: SPP-net (one scale) against R-CNN on the first test images; None if skipped."""
    if bench_images == 0:
        logger.info("[demo %d/%d] speed comparison skipped (--bench-images 0)", 6, _NUM_STAGES)
        return None
    from spp_detect.benchmark.speed_report import SpeedSettings, run_speed_report

    text = (
        f"speed comparison with R-CNN on {bench_images} test images (R-CNN timed on "
        f"{rcnn_max_windows} windows per image, extrapolated)"
    )
    with _stage(seconds, "speed", 6, text):
        settings = SpeedSettings(
            methods=("spp-1scale", "rcnn"),
            num_images=bench_images,
            warmup=1,
            rcnn_max_windows=rcnn_max_windows,
            single_scale=tuple(config.model.scales),
        )
        return run_speed_report(
            out / "data", out / "speed", year="2007", split="test", config=config,
            settings=settings, model=model_path, device=device,
            cache_dir=out / "cache" / "proposals",
        )  # fmt: skip


def run_demo(
    output_dir: Union[str, Path] = "spp_demo",
    device: Optional[str] = None,
    num_train: Optional[int] = None,
    num_test: Optional[int] = None,
    quick: bool = False,
    seed: int = 0,
    score_thresh: float = -0.5,
    bench_images: int = 2,
    rcnn_max_windows: int = 32,
    overrides: Sequence[str] = (),
) -> Dict[str, Any]:
    """Generate data, train, evaluate, detect and time SPP-net against R-CNN.

    Args:
        output_dir: everything goes here (``data/``, ``cache/``, ``model/``, ``eval/``,
            ``detections/``, ``speed/``, ``demo_summary.json``).
        device: "cpu", "cuda" or None (CUDA when present).
        num_train, num_test: toy images per split (``None``: 40 and 20, or 16 and 8 with
            ``quick``).
        quick: a smoke run: fewer images, proposals and fine-tuning iterations
            (``QUICK_SIZES``, ``QUICK_OVERRIDES``).
        seed: the dataset's seed.
        score_thresh: the ``detect`` stage keeps detections scoring above this SVM margin.
            0 is the decision boundary, but with R-CNN's C = 0.001 and a few dozen training
            images the margins of true objects are small: on the default demo, -0.5 keeps
            about two thirds correct boxes, 0 only the surest few.
        bench_images: test images timed in the speed comparison (0: skip it).
        rcnn_max_windows: R-CNN is timed on this many windows per image and extrapolated.
        overrides: ``KEY=VALUE`` config overrides on top of ``configs/toy.yaml``.
    Returns:
        The summary written to ``demo_summary.json``: ``mAP``, ``AP``, ``speedup``, per-stage
        ``seconds`` and the ``outputs`` paths.
    """
    from spp_detect.config import load_config

    out, num_train, num_test = _check_args(
        output_dir, num_train, num_test, quick, bench_images, rcnn_max_windows
    )
    config = load_config(TOY_CONFIG, (QUICK_OVERRIDES if quick else ()) + tuple(overrides))
    seconds: Dict[str, float] = {}
    t_all = time.perf_counter()
    train_set, test_set, test_proposals = _data_stages(
        out, config, num_train, num_test, seed, seconds
    )
    model_path, metrics, det_summary = _model_stages(
        out, config, device, (train_set, test_set, test_proposals), score_thresh, seconds
    )
    speed = _speed_stage(out, config, model_path, device, bench_images, rcnn_max_windows, seconds)
    seconds["total"] = time.perf_counter() - t_all
    settings = {
        "num_train": num_train,
        "num_test": num_test,
        "quick": quick,
        "seed": seed,
        "device": device,
        "score_thresh": score_thresh,
        "config": config.to_dict(),
    }
    summary = _summary(
        out, model_path, metrics, det_summary, speed, rcnn_max_windows, seconds, settings
    )
    atomic_write_json(out / "demo_summary.json", summary)
    logger.info("demo finished in %.0f s", seconds["total"])
    return summary


def _summary(
    out: Path,
    model_path: Path,
    metrics: Dict[str, Any],
    det_summary: Dict[str, Any],
    speed: Optional[Dict[str, Any]],
    rcnn_max_windows: int,
    seconds: Dict[str, float],
    settings: Dict[str, Any],
) -> Dict[str, Any]:
    """What ``demo_summary.json`` holds (see ``run_demo``)."""
    import torch

    from spp_detect.evaluation.plots import format_ap_table

    device = settings["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "mAP": metrics["mAP"],
        "metric": metrics.get("metric"),
        "AP": metrics["AP"],
        "ap_table": format_ap_table(metrics),
        "speedup": None if speed is None else speed["speedup"].get("spp-1scale"),
        "seconds_per_image": (
            None if speed is None else {m: s["total"] for m, s in speed["methods"].items()}
        ),
        "rcnn_extrapolated_from_windows": rcnn_max_windows if speed is not None else None,
        "detect": {k: det_summary[k] for k in ("images", "processed", "skipped", "detections")},
        "seconds": seconds,
        "settings": {**settings, "device": str(device)},
        "outputs": {
            "folder": str(out),
            "dataset": str(out / "data" / "VOC2007"),
            "model": str(model_path),
            "metrics": str(out / "eval" / "metrics.json"),
            "detections": det_summary["outputs"]["detections"],
            "annotated_images": det_summary["outputs"]["images"],
            "speed_report": None if speed is None else str(out / "speed" / "speed.md"),
            "summary": str(out / "demo_summary.json"),
        },
    }


def format_demo_report(summary: Dict[str, Any]) -> str:
    """What ``spp-detect demo`` prints at the end: the AP table, the speed-up, the paths."""
    o = summary["outputs"]
    lines = ["", "SPP-net on the toy dataset (test split):", summary["ap_table"], ""]
    if summary.get("speedup") is not None:
        per = summary["seconds_per_image"]
        lines.append(
            f"speed (proposals excluded): SPP-net {per['spp-1scale']:.3f} s/image, R-CNN "
            f"{per['rcnn']:.3f} s/image (extrapolated from "
            f"{summary['rcnn_extrapolated_from_windows']} windows): "
            f"SPP-net is {summary['speedup']:.1f}x faster"
        )
    d = summary["detect"]
    lines += [
        f"detect: {d['processed']} images, {d['detections']} detections",
        "",
        f"model:            {o['model']}",
        f"metrics:          {o['metrics']}",
        f"detections:       {o['detections']}",
        f"annotated images: {o['annotated_images']}",
    ]
    if o.get("speed_report"):
        lines.append(f"speed report:     {o['speed_report']}")
    lines += [
        f"summary:          {o['summary']}",
        f"total time:       {summary['seconds']['total']:.0f} s",
    ]
    return "\n".join(lines)
