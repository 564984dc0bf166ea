"""One call from detections (in memory or as VOC results files) to a written evaluation:
VOC AP (+ COCO AP on request), ``metrics.json``, ``pr_curves.png`` and the AP table in the log.
Used by ``tools/voc_eval.py`` and by the detector's test tool.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

from ..utils import atomic_write_json as save_json
from .plots import format_ap_table, plot_pr_curves
from .voc import (
    VOCEvaluator,
    read_voc_results,
    voc_results_to_detections,
    write_voc_results,
)

__all__ = ["evaluate_detections", "evaluate_results_dir", "write_report"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def write_report(
    output_dir: PathLike, metrics: Mapping, pr_curves: Mapping, title: Optional[str] = None
) -> Dict[str, Path]:
    """Write ``metrics.json`` (strict JSON: NaN -> null) and ``pr_curves.png``, atomically."""
    output_dir = Path(output_dir)
    if title is None:
        title = f"{metrics.get('metric', '')}  mAP {metrics['mAP']:.4f}"
    return {
        "metrics": save_json(output_dir / "metrics.json", dict(metrics)),
        "pr_curves": plot_pr_curves(pr_curves, output_dir / "pr_curves.png", metrics["AP"], title),
    }


def _title(dataset, metrics: Mapping) -> str:
    year, split = getattr(dataset, "year", None), getattr(dataset, "split", None)
    where = f"VOC{year} {split}, " if year and split else ""
    return f"{where}{metrics['metric']}, mAP {metrics['mAP']:.4f}"


def evaluate_results_dir(
    dataset,
    results_dir: PathLike,
    output_dir: Optional[PathLike] = None,
    use_07_metric: Optional[bool] = None,
    iou_thresh: float = 0.5,
    coco: bool = False,
    prefix: str = "comp4_det",
) -> dict:
    """Score the VOC results files in ``results_dir`` on ``dataset``.

    Args:
        dataset: a ``VOCDataset`` (needs ``split``, ``class_names``, ``image_ids``, ``records``).
        output_dir: if given, ``metrics.json`` and ``pr_curves.png`` (and the COCO JSONs) go there.
        coco: also run COCO evaluation; its numbers go under ``metrics["coco"]``.
    Returns:
        ``VOCEvaluator.evaluate()``'s dict, plus ``"coco"`` when asked.
    """
    results = read_voc_results(
        results_dir, dataset.split, dataset.class_names, dataset.image_ids, prefix=prefix
    )
    evaluator = VOCEvaluator(dataset, use_07_metric=use_07_metric, iou_thresh=iou_thresh)
    evaluator.process_voc_results(results)
    metrics = evaluator.evaluate()
    if coco:
        from .coco import evaluate_coco

        dets = voc_results_to_detections(results, dataset)
        metrics["coco"] = evaluate_coco(dataset, dets, output_dir)
    logger.debug("per-class AP:\n%s", format_ap_table(metrics))
    if output_dir is not None:
        write_report(output_dir, metrics, evaluator.pr_curves, _title(dataset, metrics))
    return metrics


def evaluate_detections(
    dataset,
    dets_by_image: Mapping[str, "Detections"],  # noqa: F821
    output_dir: Optional[PathLike] = None,
    use_07_metric: Optional[bool] = None,
    iou_thresh: float = 0.5,
    coco: bool = False,
    write_results: bool = True,
) -> dict:
    """Score in-memory detections ``{image_id: Detections}`` (continuous frame) on ``dataset``.

    With ``output_dir``: ``metrics.json``, ``pr_curves.png`` and (``write_results``) the VOC
    results files ``comp4_det_<split>_<class>.txt`` are written there, so
    ``tools/voc_eval.py --results output_dir`` reproduces the same numbers.
    """
    evaluator = VOCEvaluator(dataset, use_07_metric=use_07_metric, iou_thresh=iou_thresh)
    for image_id, dets in dets_by_image.items():
        evaluator.process(image_id, dets)
    metrics = evaluator.evaluate()
    if coco:
        from .coco import evaluate_coco

        metrics["coco"] = evaluate_coco(dataset, dets_by_image, output_dir)
    logger.debug("per-class AP:\n%s", format_ap_table(metrics))
    if output_dir is not None:
        if write_results:
            write_voc_results(output_dir, dataset.split, dataset.class_names, dets_by_image)
        write_report(output_dir, metrics, evaluator.pr_curves, _title(dataset, metrics))
    return metrics
