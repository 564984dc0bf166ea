"""Detection over a dataset split, and its evaluation (VOC AP, optionally COCO-style AP)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from spp_detect.datasets.images import read_image
from spp_detect.datasets.voc import VOCDataset
from spp_detect.modeling.base import WindowDetector
from spp_detect.modeling.build import load_detector
from spp_detect.serialization import save_file
from spp_detect.proposals.cache import compute_proposals, load_proposals_file
from spp_detect.structures import Detections
from spp_detect.utils import StageTimer, atomic_write_json, resolve_device

__all__ = ["detect_dataset", "dataset_proposals", "test_detector"]

logger = logging.getLogger(__name__)


def dataset_proposals(
    dataset: VOCDataset,
    config,
    cache_dir: Path,
    proposals_file: Optional[Union[str, Path]] = None,
) -> Dict[str, np.ndarray]:
    """Proposals for every image of a split: from a file, or selective search (cached)."""
    if proposals_file is not None:
        proposals = load_proposals_file(proposals_file)
        missing = [r.image_id for r in dataset.records if r.image_id not in proposals]
        if missing:
            raise ValueError(f"{proposals_file}: no proposals for image {missing[0]!r}")
        return proposals
    return compute_proposals(
        dataset.records,
        Path(cache_dir) / "proposals",
        jobs=config.workers,
        **config.proposals.selective_search_kwargs(),
    )


def detect_dataset(
    detector: WindowDetector,
    dataset: VOCDataset,
    proposals: Dict[str, np.ndarray],
    timer: Optional[StageTimer] = None,
) -> Dict[str, Detections]:
    """Run ``detector.detect`` on every image of the split (progress bar).

    Returns:
        ``{image_id: Detections}`` in original-image pixels.
    """
    results: Dict[str, Detections] = {}
    for rec in tqdm(dataset.records, desc=f"detect ({detector.method})", unit="img", leave=False):
        image = read_image(rec.path)
        results[rec.image_id] = detector.detect(image, proposals[rec.image_id], timer=timer)
    return results


def test_detector(
    model: Union[str, Path, WindowDetector],
    dataset: VOCDataset,
    output_dir: Union[str, Path],
    device: Optional[str] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    proposals_file: Optional[Union[str, Path]] = None,
    use_07_metric: Optional[bool] = None,
    coco: bool = False,
    overrides: Optional[Dict[str, Any]] = None,
    scales: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Detect over a split, write VOC results files and ``metrics.json``, return the metrics.

    Args:
        model: a ``model.pt`` path or a loaded detector.
        dataset: the split to test (its class list must be the model's).
        output_dir: gets ``results/comp4_det_<split>_<class>.txt``, ``detections.pt``,
            ``metrics.json`` and ``pr_curves.png``.
        use_07_metric: VOC07 11-point AP (default for year 2007) or area AP.
        coco: also compute COCO-style AP through pycocotools.
        overrides: ``TestConfig`` fields to change (e.g. ``{"classifier": "softmax"}``); the
            detector given is not changed (``with_settings`` makes a configured one).
        scales: test scales instead of the model's ``config.model.scales``.
    """
    from spp_detect.evaluation.report import evaluate_detections

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    detector = load_detector(model, dev) if not isinstance(model, WindowDetector) else model
    detector = detector.with_settings(scales=scales, **(overrides or {}))
    if list(dataset.class_names) != list(detector.class_names):
        raise ValueError(
            f"the model's classes {detector.class_names} differ from the dataset's "
            f"{dataset.class_names}"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else output_dir / "cache"
    proposals = dataset_proposals(dataset, detector.config, cache_dir, proposals_file)

    timer = StageTimer(dev)
    t0 = time.perf_counter()
    dets = detect_dataset(detector, dataset, proposals, timer)
    seconds = time.perf_counter() - t0
    save_file({k: d.to_dict() for k, d in dets.items()}, output_dir / "detections.pt")
    # VOC results files, metrics.json and pr_curves.png (the evaluation layer's one path).
    metrics = evaluate_detections(
        dataset, dets, output_dir=output_dir, use_07_metric=use_07_metric, coco=coco
    )
    n = max(1, len(dataset))
    metrics["images"] = len(dataset)
    metrics["seconds_per_image"] = seconds / n
    metrics["stage_seconds_per_image"] = {k: v / n for k, v in timer.times.items()}
    metrics["method"] = detector.method
    metrics["classifier"] = detector.config.test.classifier
    atomic_write_json(output_dir / "metrics.json", metrics)
    logger.info("mAP %.4f (%s) on %d images", metrics["mAP"], metrics.get("metric"), len(dataset))
    return metrics
