"""COCO-style box AP (AP@[.5:.95], AP50, AP75, small / medium / large) through pycocotools.

The VOC annotations and the detections are converted to COCO JSON and scored by ``COCOeval``
unchanged. Conversion choices:

- Boxes: ``[x, y, w, h]`` in the continuous frame (``w = x2 - x1``), which is the frame
  pycocotools' IoU uses (no ``+1``).
- ``difficult`` objects become ``iscrowd = 1``: in pycocotools that is the only way to make a
  ground truth "ignore" (``COCOeval._prepare`` overwrites any ``ignore`` field with
  ``iscrowd``), and it mirrors VOC: detections matched to them count neither way and several
  may match one. Unlike VOC, the overlap with a crowd box is intersection / detection area, and
  a detection first looks for a regular object.
- ``area`` (used for the small / medium / large split: 32^2 and 96^2 pixels) is the box area,
  since VOC has no instance masks.
- Ids: a ``COCODataset``'s own image and category ids (``coco_image_ids``, ``category_ids``);
  other datasets' images and categories are numbered from 1 in dataset order. Annotation ids
  start at 1 (COCOeval uses id 0 to mean "unmatched").
- COCOeval keeps at most 100 detections per image (the highest scoring), VOC keeps all.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np

from ..utils import atomic_write_json as save_json

__all__ = ["COCO_METRICS", "detections_to_coco", "evaluate_coco", "voc_to_coco_gt"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# COCOeval.stats[0:6], in order.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_ids(dataset):
    """``(image ids by record index, category ids by label)``: the dataset's own (a
    ``COCODataset``), else numbered from 1."""
    image_ids = getattr(dataset, "coco_image_ids", None)
    category_ids = getattr(dataset, "category_ids", None)
    if image_ids is None:
        image_ids = list(range(1, len(dataset.records) + 1))
    if category_ids is None:
        category_ids = list(range(1, len(dataset.class_names) + 1))
    return list(image_ids), [int(c) for c in category_ids]


def voc_to_coco_gt(dataset) -> dict:
    """Ground truth of ``dataset`` (``records``, ``class_names``) as a COCO instances dict."""
    images, annotations = [], []
    image_ids, category_ids = _coco_ids(dataset)
    for i, r in enumerate(dataset.records):
        images.append(
            {"id": image_ids[i], "file_name": Path(r.path).name, "width": int(r.width),
             "height": int(r.height)}
        )  # fmt: skip
        for box, label, difficult in zip(
            np.asarray(r.boxes, np.float64).tolist(), r.labels.tolist(), r.difficult.tolist()
        ):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_ids[i],
                "category_id": category_ids[int(label)],
                "bbox": [box[0], box[1], w, h],
                "area": w * h,
                "iscrowd": int(bool(difficult)),
            })  # fmt: skip
    categories = [{"id": category_ids[k], "name": c} for k, c in enumerate(dataset.class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def detections_to_coco(dataset, dets_by_image: Mapping[str, "Detections"]) -> List[dict]:  # noqa: F821
    """``{image_id: Detections}`` (continuous frame) -> COCO results list.

    Raises:
        ValueError: an image id not in ``dataset``, a label out of range or a non-finite value.
    """
    image_index = {r.image_id: i for i, r in enumerate(dataset.records)}
    image_ids, category_ids = _coco_ids(dataset)
    num_classes = len(dataset.class_names)
    out: List[dict] = []
    for image_id, dets in dets_by_image.items():
        i = image_index.get(image_id)
        if i is None:
            raise ValueError(f"detections for unknown image id {image_id!r} (not in the dataset)")
        if len(dets) == 0:
            continue
        boxes = dets.boxes.detach().cpu().double().numpy()
        scores = dets.scores.detach().cpu().double().numpy()
        labels = dets.labels.detach().cpu().numpy()
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image {image_id!r}: non-finite box or score")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"image {image_id!r}: label out of range for {num_classes} classes")
        for b, s, k in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            out.append({
                "image_id": image_ids[i],
                "category_id": category_ids[int(k)],
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "score": s,
            })  # fmt: skip
    return out


def _log_captured(text: str) -> None:
    for line in text.splitlines():
        if line.strip():
            logger.info("pycocotools: %s", line.rstrip())


def evaluate_coco(
    dataset,
    dets_by_image: Mapping[str, "Detections"],  # noqa: F821
    output_dir: Optional[PathLike] = None,
) -> Dict[str, float]:
    """COCO box AP of the detections on ``dataset`` via ``pycocotools.COCOeval``.

    Args:
        dataset: ``VOCDataset`` or any object with ``records`` and ``class_names``.
        dets_by_image: ``{image_id: Detections}``, boxes in the continuous frame.
        output_dir: if given, ``coco_gt.json`` and ``coco_results.json`` are written there.
    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}``; NaN where COCOeval reports -1 (no
        ground truth in that area range). pycocotools' printout goes to the log (INFO).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_json = voc_to_coco_gt(dataset)
    dt_json = detections_to_coco(dataset, dets_by_image)
    if output_dir is not None:
        save_json(Path(output_dir) / "coco_gt.json", gt_json)
        save_json(Path(output_dir) / "coco_results.json", dt_json)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt_json)
        coco_gt.createIndex()
        if dt_json:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dt_json))
        else:
            # loadRes cannot take an empty list; an empty result set scores 0 where there is
            # ground truth.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(gt_json["images"]),
                "categories": list(gt_json["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    _log_captured(buf.getvalue())
    stats = [float(v) for v in coco_eval.stats[: len(COCO_METRICS)]]
    nan = float("nan")
    # COCOeval reports -1 where a metric is undefined (no ground truth in the area range).
    return {k: (v if math.isfinite(v) and v >= 0 else nan) for k, v in zip(COCO_METRICS, stats)}
