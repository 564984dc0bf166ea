"""The speed comparison of SPP-net and R-CNN (SPP-net sec. 4.2, Table 10): one run, same images,
same proposals, same backbone weights, per-stage medians, written as JSON, markdown and a chart.

The pieces: ``variants`` builds the detectors compared, ``timing`` times them fairly,
``machine`` describes the computer, ``plots`` draws the table and the chart. Timing needs no
trained model (the weights do not change the work): without model files the detectors get
untrained heads and only times are reported. With model files the VOC AP of each method on the
same N images is reported too, from the detections of the timed runs.
"""

from __future__ import annotations

import logging
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from spp_detect.benchmark.machine import load_average, machine_info
from spp_detect.benchmark.timing import benchmark_detectors, summarize_method, time_proposals
from spp_detect.benchmark.variants import (
    METHODS,
    PAPER_FIVE_SCALES,
    PAPER_SINGLE_SCALE,
    build_method_detectors,
)
from spp_detect.config import DetectorConfig
from spp_detect.datasets.images import read_image
from spp_detect.datasets.voc import VOCDataset
from spp_detect.modeling.base import WindowDetector
from spp_detect.modeling.build import load_detector
from spp_detect.proposals.settings import ProposalSettings
from spp_detect.structures import Detections
from spp_detect.utils import atomic_write_json, atomic_write_text, resolve_device

__all__ = ["SpeedSettings", "compute_speedups", "run_speed_report", "write_report"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class SpeedSettings:
    # Methods to time, from variants.METHODS.
    methods: Tuple[str, ...] = METHODS
    # Images of the split to time (the first N of ImageSets/Main/<split>.txt).
    num_images: int = 10
    # Untimed passes over the first image per method (allocator, kernels, caches).
    warmup: int = 1
    # R-CNN: time only the first K windows of each image and extrapolate (0: all windows).
    rcnn_max_windows: int = 0
    # SPP-net sec. 4.1: one scale s = 688; five scales {480, 576, 688, 864, 1200}.
    single_scale: Tuple[int, ...] = PAPER_SINGLE_SCALE
    five_scales: Tuple[int, ...] = PAPER_FIVE_SCALES
    # Seed of the untrained heads (no model file).
    seed: int = 0
    # R-CNN with spp-1scale-fast's test-time speed options (variants.FAST_OPTIONS): "auto"
    # (when spp-1scale-fast is timed, so that its speed-up compares like with like), "on", "off".
    rcnn_fast: str = "auto"

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {self.num_images}")
        if self.warmup < 0 or self.rcnn_max_windows < 0:
            raise ValueError("--warmup and --rcnn-max-windows must be >= 0")


def compute_speedups(methods: Mapping[str, Any]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """R-CNN's median time over each other method's, without and with proposals (empty
    without an ``rcnn`` entry)."""
    speedup: Dict[str, float] = {}
    with_proposals: Dict[str, float] = {}
    if "rcnn" not in methods:
        return speedup, with_proposals
    rcnn = methods["rcnn"]
    for m, s in methods.items():
        if m != "rcnn" and s["total"] > 0:
            speedup[m] = rcnn["total"] / s["total"]
            with_proposals[m] = rcnn["total_with_proposals"] / s["total_with_proposals"]
    return speedup, with_proposals


def _accuracy(
    dataset: VOCDataset, records: Sequence[Any], dets: Dict[str, Detections]
) -> Dict[str, Any]:
    """VOC AP of ``dets`` on the ground truth of ``records`` (the images timed)."""
    from spp_detect.evaluation.report import evaluate_detections

    subset = types.SimpleNamespace(
        records=list(records),
        class_names=list(dataset.class_names),
        year=dataset.year,
        split=dataset.split,
    )
    metrics = evaluate_detections(subset, dets)
    return {"mAP": metrics["mAP"], "AP": metrics["AP"], "metric": metrics["metric"]}


def _summaries(
    per_image: Dict[str, Any],
    dets: Dict[str, Dict[str, Detections]],
    info: Dict[str, Dict[str, Any]],
    dataset: VOCDataset,
    records: Sequence[Any],
) -> Dict[str, Any]:
    """Per method: the timing summary, ``variants``' description and, with trained heads, the
    accuracy (not for an extrapolated method, whose detections come from repeated features)."""
    methods: Dict[str, Any] = {}
    for m, recs in per_image.items():
        summary = summarize_method(recs)
        summary.update(info[m])
        if info[m]["heads"] == "model" and not summary["extrapolated"]:
            summary.update(_accuracy(dataset, records, dets[m]))
        elif info[m]["heads"] == "model":
            summary["mAP"] = None
            summary["mAP_note"] = (
                f"not measured: timed on the first {summary['measured_windows']} windows only"
            )
        methods[m] = summary
    return methods


def _default_proposals(
    config: DetectorConfig, *models: Optional[WindowDetector]
) -> ProposalSettings:
    """The settings a trained model was trained with (the first given), else ``config``'s."""
    for m in models:
        if m is not None:
            return m.config.proposals
    return config.proposals


def _open_inputs(
    voc_root: PathLike,
    year: str,
    split: str,
    num_images: int,
    model: Optional[PathLike],
    rcnn_model: Optional[PathLike],
    device: torch.device,
) -> Tuple[Optional[WindowDetector], Optional[WindowDetector], VOCDataset, Sequence[Any]]:
    """The model files (loaded in eval mode on ``device``), the split (with the models' class
    list) and its first ``num_images`` records."""
    loaded = load_detector(model, device) if model is not None else None
    loaded_rcnn = load_detector(rcnn_model, device) if rcnn_model is not None else None
    ref = loaded or loaded_rcnn
    class_names = ref.class_names if ref is not None else None
    dataset = VOCDataset(voc_root, year=year, split=split, class_names=class_names)
    records = dataset.records[:num_images]
    if not records:
        raise ValueError(f"{dataset.voc_dir}: split {split!r} has no images")
    if len(records) < num_images:
        logger.warning("split %s has only %d images", split, len(records))
    return loaded, loaded_rcnn, dataset, records


def _describe_run(
    dataset: VOCDataset,
    images: Sequence[Any],
    image_ids: Sequence[str],
    device: torch.device,
    settings: SpeedSettings,
) -> Dict[str, Any]:
    """The data and the protocol of a run, for the report's ``settings``."""
    return {
        "voc_root": str(dataset.root),
        "year": dataset.year,
        "split": dataset.split,
        "num_images": len(image_ids),
        "image_ids": list(image_ids),
        "image_sizes": [list(im.shape[:2]) for im in images],
        "device": str(device),
        "warmup": settings.warmup,
        "rcnn_max_windows": settings.rcnn_max_windows,
        "order": "methods interleaved per image, after a warm-up per method",
    }


def write_report(report: Mapping[str, Any], output_dir: PathLike) -> None:
    """``speed.json``, ``speed.md`` and ``speed.png`` in ``output_dir``."""
    from spp_detect.benchmark.plots import format_speed_markdown, plot_speed

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / "speed.json", report)
    atomic_write_text(output_dir / "speed.md", format_speed_markdown(report))
    try:
        plot_speed(report, output_dir / "speed.png")
    except Exception as exc:  # noqa: BLE001 - a failed plot must not lose the figures
        logger.warning("could not draw speed.png: %s", exc)


def _log_summary(report: Mapping[str, Any]) -> None:
    for m, s in report["methods"].items():
        logger.info(
            "%s: %.3f s per image (%.3f s with proposals)%s", m, s["total"],
            s["total_with_proposals"], " [extrapolated]" if s["extrapolated"] else "",
        )  # fmt: skip
    for m, x in report["speedup"].items():
        logger.info("speed-up of %s over R-CNN: %.1fx", m, x)


def _time_methods(detectors, records, proposal_settings, cache: Path, settings, dev):
    """Read the images, time the proposals and every detector on them; returns the load
    average before, the images, their ids, the boxes, and ``benchmark_detectors``' timings and
    detections."""
    load_before = load_average()
    images = [read_image(r.path) for r in records]
    image_ids = [r.image_id for r in records]
    boxes, ss_seconds = time_proposals(records, images, proposal_settings, cache)
    caps = {"rcnn": settings.rcnn_max_windows} if settings.rcnn_max_windows else {}
    logger.info(
        "timing %s on %d images (%s windows per image) on %s",
        ", ".join(detectors), len(records),
        "/".join(str(len(boxes[i])) for i in image_ids), dev,
    )  # fmt: skip
    per_image, dets = benchmark_detectors(
        detectors, image_ids, images, boxes, ss_seconds, dev, settings.warmup, caps
    )
    return load_before, images, image_ids, boxes, per_image, dets


def run_speed_report(
    voc_root: PathLike,
    output_dir: PathLike,
    year: str = "2007",
    split: str = "test",
    config: Optional[DetectorConfig] = None,
    settings: Optional[SpeedSettings] = None,
    model: Optional[PathLike] = None,
    rcnn_model: Optional[PathLike] = None,
    device: Optional[str] = None,
    weights: Union[str, bool, Path] = "auto",
    cache_dir: Optional[PathLike] = None,
    proposals: Optional[ProposalSettings] = None,
) -> Dict[str, Any]:
    """Time SPP-net (1 scale, 1 scale with SVD, 5 scales) and R-CNN on the first N images of a
    split; write ``speed.json``, ``speed.md`` and ``speed.png`` in ``output_dir``.

    Args:
        voc_root: VOCdevkit folder; ``year`` and ``split`` pick ``VOC<year>``'s image list.
        config: fresh detectors' configuration (backbone, fc width) where no model is given;
            paper defaults.
        settings: methods, N, warm-up, R-CNN window cap, scale sets.
        model / rcnn_model: trained ``model.pt`` files; with them the VOC AP of each method on
            the N images is reported too.
        weights: backbone weights of fresh detectors: "auto" (ImageNet if available, else
            random), "imagenet", "none" or a file.
        cache_dir: proposal cache (default ``output_dir/cache/proposals``).
        proposals: how every method's windows are made; default: the proposal settings of the
            SPP-net model (else the R-CNN model's, what it was trained with), else
            ``config.proposals``.
    Returns:
        The report (the content of ``speed.json``).
    """
    settings = settings or SpeedSettings()
    config = config or DetectorConfig()
    dev = resolve_device(device)
    loaded, loaded_rcnn, dataset, records = _open_inputs(
        voc_root, year, split, settings.num_images, model, rcnn_model, dev
    )
    ref = loaded or loaded_rcnn
    proposal_settings = proposals or _default_proposals(config, loaded, loaded_rcnn)
    detectors, info = build_method_detectors(
        settings.methods, dataset.class_names, config, dev, loaded, loaded_rcnn, weights,
        settings.single_scale, settings.five_scales, settings.seed,
        rcnn_fast=settings.rcnn_fast,
    )  # fmt: skip
    cache = Path(cache_dir) if cache_dir is not None else Path(output_dir) / "cache" / "proposals"
    load_before, images, image_ids, boxes, per_image, dets = _time_methods(
        detectors, records, proposal_settings, cache, settings, dev
    )
    methods = _summaries(per_image, dets, info, dataset, records)
    speedup, speedup_with_proposals = compute_speedups(methods)
    first = next(iter(detectors))
    run_settings = {
        **_describe_run(dataset, images, image_ids, dev, settings),
        "backbone": detectors[first].backbone.name,
        "backbone_weights": info[first]["backbone_weights"],
        "proposals": {
            **proposal_settings.to_dict(),
            "windows_per_image": [int(len(boxes[i])) for i in image_ids],
            "cache_dir": str(cache),
        },
        "model": None if model is None else str(model),
        "rcnn_model": None if rcnn_model is None else str(rcnn_model),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "classifier": (ref.config if ref is not None else config).test.classifier,
    }
    report: Dict[str, Any] = {
        "methods": methods,
        "speedup": speedup,
        "speedup_with_proposals": speedup_with_proposals,
        "machine": machine_info(dev),
        "settings": run_settings,
    }
    write_report(report, output_dir)
    _log_summary(report)
    return report
