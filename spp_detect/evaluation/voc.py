"""Pascal VOC detection AP: a faithful port of the devkit's ``VOCevaldet.m`` and ``VOCap.m``.

The rules, as the devkit applies them for one class:

1. Detections are sorted by decreasing score with MATLAB's ``sort(-confidence)``, which is
   stable: equal scores keep their input order (here: the order of ``process`` calls and, within
   an image, the detection index; for results files, the line order).
2. Each detection takes, in its image, the ground truth of this class with the highest overlap
   (the first one on ties), among ALL of them: matched, unmatched and ``difficult`` alike.
   Overlap is computed in VOC's 1-based inclusive pixels (``iw = min(x2) - max(x1) + 1``; the
   only ``+1`` arithmetic of spp_detect, see ``voc_iou``), and only boxes that intersect
   (``iw > 0 & ih > 0``) are candidates.
3. ``if ovmax >= VOCopts.minoverlap`` (0.5; greater OR EQUAL, unlike py-faster-rcnn's ``>``):
   a ``difficult`` object -> the detection is ignored (neither TP nor FP, and the object is
   never marked detected); an object already detected -> FP (duplicate), even when another,
   unmatched object also overlaps it by 0.5; otherwise TP. Below the threshold -> FP.
4. ``npos`` counts the non-difficult objects. ``rec = tp / npos``, ``prec = tp / (tp + fp)``.
5. AP: VOC2007 (devkit up to 2009) samples the precision envelope at 11 recall levels,
   VOC2010+ (``VOCap.m``) integrates the monotone envelope over recall.

Two choices where the devkit is undefined or quirky, both documented where applied:
``prec`` is 0 where ``tp + fp = 0`` (the devkit's 0/0 = NaN, which MATLAB's ``max`` skips), and
a class without non-difficult ground truth gets AP NaN (excluded from the mAP, with a warning).

Boxes are converted from the continuous frame of ``spp_detect.structures.boxes`` here with
``spp_detect.structures.voc_pixels.boxes_to_voc_pixels``, the inverse of the load-time conversion
in ``spp_detect/datasets/voc.py``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..structures.detections import Detections
from ..structures.voc_pixels import boxes_to_voc_pixels, voc_pixels_to_boxes
from .voc_results import VOCClassResults, read_voc_results, write_voc_results

__all__ = [
    "METRIC_07",
    "METRIC_AREA",
    "VOCEvaluator",
    "evaluate_voc_results",
    "match_detections",
    "read_voc_results",
    "use_07_metric_for_year",
    "voc_ap",
    "voc_iou",
    "voc_results_to_detections",
    "write_voc_results",
]

logger = logging.getLogger(__name__)

METRIC_07 = "VOC07 11-point"
METRIC_AREA = "VOC area"

# The devkit loops ``for t=0:0.1:1``. MATLAB's colon operator computes the first half of the
# range as k*0.1 and the second half as 1-(10-k)*0.1, so its 4th element is 3*0.1 =
# 0.30000000000000004, not the double nearest 0.3 (MATLAB Answers, "colon operator numerical
# error": a = 0:.1:1; a(4) - .3 = 5.5511e-17); a recall of exactly 0.3 does not reach it. The
# other ten values equal k/10. We use the same values, to agree with the devkit to the bit.
VOC07_RECALL_THRESHOLDS = tuple(k * 0.1 if k <= 5 else 1.0 - (10 - k) * 0.1 for k in range(11))


def voc_iou(boxes_voc: np.ndarray, gt_voc: np.ndarray) -> np.ndarray:
    """The devkit's overlap of every detection with every ground truth.

    Args:
        boxes_voc (float [D, 4]), gt_voc (float [G, 4]): VOC 1-based inclusive pixels.
    Returns:
        float64 [D, G]: ``iw*ih / ua`` with the devkit's ``+1`` widths, evaluated in the
        devkit's operation order; ``-inf`` where the boxes do not intersect (not candidates).
    """
    b = np.asarray(boxes_voc, dtype=np.float64).reshape(-1, 1, 4)
    g = np.asarray(gt_voc, dtype=np.float64).reshape(1, -1, 4)
    iw = np.minimum(b[..., 2], g[..., 2]) - np.maximum(b[..., 0], g[..., 0]) + 1
    ih = np.minimum(b[..., 3], g[..., 3]) - np.maximum(b[..., 1], g[..., 1]) + 1
    ua = (
        (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
        + (g[..., 2] - g[..., 0] + 1) * (g[..., 3] - g[..., 1] + 1)
        - iw * ih
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = iw * ih / ua
    return np.where((iw > 0) & (ih > 0), ov, -np.inf)


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """AP from the recall and precision after each detection (sorted by decreasing score).

    ``use_07_metric``: VOC2007 11-point AP, ``sum_t max(prec[rec >= t]) / 11`` (0 where no
    recall reaches t). Otherwise ``VOCap.m``: make precision monotone decreasing from the right
    and sum ``(r_i - r_{i-1}) * p_i`` where recall changes, with (0, 0) and (1, 0) appended.
    """
    rec = np.asarray(rec, dtype=np.float64).ravel()
    prec = np.asarray(prec, dtype=np.float64).ravel()
    if use_07_metric:
        ap = 0.0
        for t in VOC07_RECALL_THRESHOLDS:
            p = prec[rec >= t]
            ap = ap + (float(p.max()) if p.size else 0.0) / 11
        return ap
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def use_07_metric_for_year(year) -> bool:
    """True (11-point AP) for VOC2007..2009, False (area) for 2010+ and non-numeric years."""
    try:
        return int(str(year)) < 2010
    except (TypeError, ValueError):
        return False


def match_detections(
    gt_boxes: Sequence[np.ndarray],
    gt_difficult: Sequence[np.ndarray],
    det_image: np.ndarray,
    det_scores: np.ndarray,
    det_boxes: np.ndarray,
    iou_thresh: float = 0.5,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The devkit's assignment of one class's detections to its ground truth.

    Args:
        gt_boxes: per image, float [G_i, 4] VOC pixels of this class's objects.
        gt_difficult: per image, bool [G_i].
        det_image (int [D]): image index of each detection; det_scores (float [D]);
        det_boxes (float [D, 4]): VOC pixels. In input order (ties keep it).
        iou_thresh: VOCopts.minoverlap (0.5); a match needs ``overlap >= iou_thresh``.
    Returns:
        order (int64 [D]): detection indices by decreasing score (stable);
        tp, fp (bool [D]): in that order; a detection ignored for a difficult object is neither.
    """
    det_scores = np.asarray(det_scores, dtype=np.float64).ravel()
    nd = det_scores.size
    # [sc,si]=sort(-confidence): MATLAB's sort is stable.
    order = np.argsort(-det_scores, kind="stable")
    tp = np.zeros(nd, dtype=bool)
    fp = np.zeros(nd, dtype=bool)
    if nd == 0:
        return order, tp, fp
    # Matching state is per image, so each image's detections are processed on their own, in
    # the global order; vectorised overlaps, then the devkit's sequential loop.
    sorted_image = np.asarray(det_image, dtype=np.int64)[order]
    grouped = np.argsort(sorted_image, kind="stable")  # positions, grouped by image, in order
    images, starts = np.unique(sorted_image[grouped], return_index=True)
    ends = np.append(starts[1:], nd)
    for i, s, e in zip(images.tolist(), starts.tolist(), ends.tolist()):
        pos = grouped[s:e]
        gt = gt_boxes[i]
        if len(gt) == 0:
            fp[pos] = True
            continue
        ov = voc_iou(det_boxes[order[pos]], gt)
        jmax = ov.argmax(axis=1)  # first maximum, as the devkit's ``if ov>ovmax``
        ovmax = ov[np.arange(len(pos)), jmax]
        difficult = gt_difficult[i]
        detected = np.zeros(len(gt), dtype=bool)
        for p, j, o in zip(pos.tolist(), jmax.tolist(), ovmax.tolist()):
            if o >= iou_thresh:
                if not difficult[j]:
                    if not detected[j]:
                        tp[p] = True
                        detected[j] = True
                    else:
                        fp[p] = True  # multiple detection
                # difficult: neither TP nor FP
            else:
                fp[p] = True
    return order, tp, fp


class VOCEvaluator:
    """Accumulates detections image by image and computes VOC AP per class.

    Args:
        dataset: a ``VOCDataset`` (or any object with ``records``, ``class_names`` and
            optionally ``year``) holding the ground truth of every image of the split.
        use_07_metric: None -> by year (11-point for VOC2007..2009, area for 2010+).
        iou_thresh: VOCopts.minoverlap, 0.5.

    ``evaluate()`` returns ``{"mAP", "AP": {class: ap}, "metric", "iou_thresh", "num_gt":
    {class: non-difficult objects}, "num_detections": {class: n}}`` (also kept as
    ``self.metrics``) and keeps the curves in ``self.pr_curves[class] = {"recall": float64 [D],
    "precision": float64 [D]}``.
    Ground truth of images never processed still counts (as missed objects).
    """

    def __init__(self, dataset, use_07_metric: Optional[bool] = None, iou_thresh: float = 0.5):
        self.class_names: List[str] = list(dataset.class_names)
        self.year = getattr(dataset, "year", None)
        if use_07_metric is None:
            use_07_metric = use_07_metric_for_year(self.year)
        self.use_07_metric = bool(use_07_metric)
        self.iou_thresh = float(iou_thresh)
        records = list(dataset.records)
        self.image_ids = [r.image_id for r in records]
        self._image_index = {r.image_id: i for i, r in enumerate(records)}
        if len(self._image_index) != len(records):
            raise ValueError("dataset has repeated image ids")
        num_classes = len(self.class_names)
        # Per class, per image: ground-truth boxes in VOC pixels and difficult flags.
        self._gt_boxes = [[None] * len(records) for _ in range(num_classes)]
        self._gt_difficult = [[None] * len(records) for _ in range(num_classes)]
        for i, r in enumerate(records):
            voc = boxes_to_voc_pixels(r.boxes)
            for k in range(num_classes):
                m = r.labels == k
                self._gt_boxes[k][i] = voc[m]
                self._gt_difficult[k][i] = np.asarray(r.difficult, dtype=bool)[m]
        self.pr_curves: Dict[str, Dict[str, np.ndarray]] = {}
        self.metrics: Optional[dict] = None
        self.reset()

    def reset(self) -> None:
        # One chunk per process() call / per class file: (image index, score, VOC box, label).
        self._chunks: List[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._seen: set = set()
        self._from_files = False
        self.pr_curves = {}
        self.metrics = None

    def process(self, image_id: str, detections: Detections) -> None:
        """Add the detections of one image (boxes in the continuous frame, 0-based labels)."""
        i = self._image_index.get(image_id)
        if i is None:
            raise ValueError(f"detections for unknown image id {image_id!r} (not in the dataset)")
        if i in self._seen:
            raise ValueError(f"image {image_id!r} processed twice")
        if len(detections) == 0:
            self._seen.add(i)
            return
        boxes = boxes_to_voc_pixels(detections.boxes)
        scores = detections.scores.detach().cpu().numpy().astype(np.float32)
        labels = detections.labels.detach().cpu().numpy().astype(np.int64)
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image {image_id!r}: detections with non-finite boxes or scores")
        if labels.min() < 0 or labels.max() >= len(self.class_names):
            raise ValueError(
                f"image {image_id!r}: label {int(labels.max())} out of range for "
                f"{len(self.class_names)} classes"
            )
        self._seen.add(i)
        self._chunks.append((np.full(len(labels), i, np.int64), scores, boxes, labels))

    def process_voc_results(self, results: Mapping[str, VOCClassResults]) -> None:
        """Add detections read by ``read_voc_results`` (boxes already in VOC pixels; image
        indices into this dataset's ``image_ids``), keeping the file order for ties."""
        for name, res in results.items():
            if name not in self.class_names:
                raise ValueError(f"results for unknown class {name!r}")
            k = self.class_names.index(name)
            labels = np.full(len(res.scores), k, np.int64)
            self._chunks.append((res.image_index, res.scores, res.boxes, labels))
        self._from_files = True

    def evaluate(self) -> dict:
        num_images = len(self.image_ids)
        if not self._from_files and len(self._seen) < num_images:
            logger.warning(
                "%d of %d images were not processed; their objects count as missed",
                num_images - len(self._seen), num_images,
            )  # fmt: skip
        aps, num_gt, num_det = {}, {}, {}
        self.pr_curves = {}
        # All detections in input order; a stable sort by label keeps that order per class.
        all_image = np.concatenate([np.zeros(0, np.int64)] + [c[0] for c in self._chunks])
        all_scores = np.concatenate([np.zeros(0, np.float32)] + [c[1] for c in self._chunks])
        all_boxes = np.concatenate([np.zeros((0, 4), np.float32)] + [c[2] for c in self._chunks])
        all_labels = np.concatenate([np.zeros(0, np.int64)] + [c[3] for c in self._chunks])
        by_label = np.argsort(all_labels, kind="stable")
        bounds = np.searchsorted(all_labels[by_label], np.arange(len(self.class_names) + 1))
        for k, name in enumerate(self.class_names):
            sel = by_label[bounds[k] : bounds[k + 1]]
            scores = all_scores[sel]
            _, tp, fp = match_detections(
                self._gt_boxes[k], self._gt_difficult[k], all_image[sel], scores,
                all_boxes[sel], self.iou_thresh,
            )  # fmt: skip
            npos = int(sum(int((~d).sum()) for d in self._gt_difficult[k]))
            ctp = np.cumsum(tp).astype(np.float64)
            cfp = np.cumsum(fp).astype(np.float64)
            # Precision 0 where no detection has counted yet (leading ignored ones): the
            # devkit's 0/0 = NaN there, which MATLAB's max skips, so the AP is the same.
            denom = ctp + cfp
            prec = np.divide(ctp, denom, out=np.zeros_like(ctp), where=denom > 0)
            if npos > 0:
                rec = ctp / npos
                ap = voc_ap(rec, prec, self.use_07_metric)
            else:
                # No non-difficult object: recall is 0/0. The devkit then gives 0 (VOC07), and
                # NaN (VOCap) if the class has detections, 0 if not. AP is undefined: NaN,
                # left out of the mAP.
                rec = np.full_like(ctp, np.nan)
                ap = float("nan")
                logger.warning("class %r has no non-difficult ground truth: AP = NaN", name)
            aps[name], num_gt[name], num_det[name] = float(ap), npos, int(len(scores))
            self.pr_curves[name] = {"recall": rec, "precision": prec}
        valid = [v for v in aps.values() if not np.isnan(v)]
        m_ap = float(np.mean(valid)) if valid else float("nan")
        metric = METRIC_07 if self.use_07_metric else METRIC_AREA
        logger.info("%s mAP = %.4f over %d classes", metric, m_ap, len(valid))
        self.metrics = {
            "mAP": m_ap,
            "AP": aps,
            "metric": metric,
            "iou_thresh": self.iou_thresh,
            "num_gt": num_gt,
            "num_detections": num_det,
        }
        return dict(self.metrics)


def evaluate_voc_results(
    dataset,
    results_dir,
    use_07_metric: Optional[bool] = None,
    iou_thresh: float = 0.5,
    prefix: str = "comp4_det",
) -> dict:
    """Score the VOC results files ``<results_dir>/<prefix>_<split>_<class>.txt`` of
    ``dataset`` (its ``split``, ``class_names`` and ``image_ids``).

    Returns:
        the metrics dict of ``VOCEvaluator.evaluate``. (For the precision-recall curves too,
        feed ``read_voc_results`` to ``VOCEvaluator.process_voc_results`` and read
        ``evaluator.pr_curves``, as ``evaluation.report`` does.)
    Raises:
        ValueError: a missing class file, a malformed line or an unknown image id (file:line).
    """
    results = read_voc_results(
        results_dir, dataset.split, dataset.class_names, dataset.image_ids, prefix=prefix
    )
    evaluator = VOCEvaluator(dataset, use_07_metric=use_07_metric, iou_thresh=iou_thresh)
    evaluator.process_voc_results(results)
    return evaluator.evaluate()


def voc_results_to_detections(
    results: Mapping[str, VOCClassResults], dataset
) -> Dict[str, Detections]:
    """Results read from files -> ``{image_id: Detections}`` in the continuous frame (for COCO
    evaluation). Every image of the dataset gets an entry, empty where it has no detection."""
    import torch

    index = {c: k for k, c in enumerate(dataset.class_names)}
    per_image: Dict[int, List[Tuple[np.ndarray, np.ndarray, np.ndarray]]] = defaultdict(list)
    for name, res in results.items():
        boxes = voc_pixels_to_boxes(res.boxes)
        labels = np.full(len(res.scores), index[name], np.int64)
        for i in np.unique(res.image_index).tolist():
            m = res.image_index == i
            per_image[i].append((boxes[m], res.scores[m], labels[m]))
    out: Dict[str, Detections] = {}
    for i, r in enumerate(dataset.records):
        size = (int(r.height), int(r.width))
        parts = per_image.get(i)
        if not parts:
            out[r.image_id] = Detections.empty(size)
            continue
        out[r.image_id] = Detections(
            torch.from_numpy(np.concatenate([p[0] for p in parts])),
            torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.float32)),
            torch.from_numpy(np.concatenate([p[2] for p in parts])),
            size,
        )
    return out
