"""Stages 2 and 3 of detector training, in one pass over the training images:

- per-class linear SVMs on fc7 with one pass of hard negative mining (R-CNN / SPP-net;
  ``training/svm_training.py``);
- per-class ridge box regressors on the pooled conv features of windows that overlap a ground
  truth (SPP_net code: IoU > 0.5, lambda 4000; ``training/bbox_training.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou
from tqdm import tqdm

from spp_detect.config import DetectorConfig
from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.modeling.svm import LinearSVMs, mean_norm_scale
from spp_detect.training.bbox_training import BoxRegressionTrainer
from spp_detect.training.finetune import TrainingImage
from spp_detect.training.svm_training import MiningImage, SVMSolver, train_svms
from spp_detect.training.window_features import all_rows

__all__ = ["train_svms_and_regressors", "class_ious"]

logger = logging.getLogger(__name__)

# Windows per image sampled to set the SVM feature scale (R-CNN samples random windows).
_SCALE_SAMPLE_IMAGES = 20
_SCALE_SAMPLE_WINDOWS = 200
# Box-regression windows kept per image (bounds memory on large datasets).
_BBOX_MAX_PER_IMAGE = 256


def class_ious(windows: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int) -> Tensor:
    """Tensor[R, K]: each window's highest IoU with a ground truth of each class (0 if none)."""
    out = windows.new_zeros(windows.shape[0], num_classes)
    if gt_boxes.shape[0] == 0:
        return out
    iou = box_iou(windows, gt_boxes.to(windows))  # [R, G]
    for c in gt_labels.unique().tolist():
        out[:, c] = iou[:, gt_labels.to(windows.device) == c].max(dim=1).values
    return out


@torch.no_grad()
def _fc7(detector, pooled: Tensor) -> Tensor:
    return detector.head.fc7_features(pooled)


def train_svms_and_regressors(
    detector, source, images: Sequence[TrainingImage], config: DetectorConfig
) -> Tuple[LinearSVMs, Optional[BoxRegressor], Dict[str, Any]]:
    """Train the SVMs and box regressors of ``detector`` (head in eval mode).

    Args:
        detector: a ``WindowDetector`` whose head has been fine-tuned.
        source: training window features prepared on ``images`` (``rows(i, idx)``).
        images: ground truths first, then proposals, per image.
    Returns:
        ``(svms, bbox_regressor, stats)``; the regressor is None when ``config.bbox_reg`` is
        disabled or no window overlaps a ground truth enough.
    """
    detector.eval()
    k = detector.num_classes
    rng = np.random.default_rng(config.finetune.seed)
    # A first, light pass: every ground truth's fc7 (the SVM positives, given up front as in
    # R-CNN so no class mines against a zero model for long) and a random sample of windows
    # to set the feature scales (R-CNN scales features to a mean norm of 20 measured on random
    # windows).
    pos_feats, pos_labels, fc7_sample, pooled_sample = [], [], [], []
    for i, im in enumerate(tqdm(images, desc="SVM positives", unit="img", leave=False)):
        g = im.gt_boxes.shape[0]
        idx = torch.arange(g)
        if i < _SCALE_SAMPLE_IMAGES:
            n = im.windows.shape[0]
            extra = rng.choice(n, size=min(n, _SCALE_SAMPLE_WINDOWS), replace=False)
            idx = torch.cat([idx, torch.from_numpy(extra).long()])
        if idx.numel() == 0:
            continue
        pooled = source.rows(i, idx)
        feats = _fc7(detector, pooled)
        pos_feats.append(feats[:g])
        pos_labels.append(im.gt_labels.to(feats.device))
        fc7_sample.append(feats[g:])
        pooled_sample.append(pooled[g:])
    positives = (torch.cat(pos_feats), torch.cat(pos_labels))
    fc7_sample = torch.cat(fc7_sample)
    bbox_scale = mean_norm_scale(torch.cat(pooled_sample), config.svm.feature_norm)
    bbox = BoxRegressionTrainer.from_config(
        config.bbox_reg, max_per_image=_BBOX_MAX_PER_IMAGE, seed=config.finetune.seed
    )

    def stream() -> Iterator[MiningImage]:
        for i, im in enumerate(tqdm(images, desc="SVM mining + bbox", unit="img", leave=False)):
            pooled = all_rows(source, i)
            feats = _fc7(detector, pooled)
            windows = im.windows.to(feats.device)
            g = im.gt_boxes.shape[0]
            is_gt = torch.zeros(windows.shape[0], dtype=torch.bool, device=feats.device)
            is_gt[:g] = True
            ious = class_ious(windows, im.gt_boxes, im.gt_labels, k)
            if config.bbox_reg.enabled:
                bbox.add_image(pooled, windows, im.gt_boxes, im.gt_labels)
            yield MiningImage(feats, ious, is_gt, im.gt_labels.to(feats.device), windows)

    s = config.svm
    svms = train_svms(
        stream(),
        k,
        positives=positives,
        feature_scale=fc7_sample,
        solver=SVMSolver(C=s.C, pos_weight=s.pos_weight, bias_multiplier=s.bias_multiplier),
        feature_norm=s.feature_norm,
        neg_iou_thresh=s.neg_iou_thresh,
        dedup_negatives=s.dedup_negatives,
        neg_overlap=s.neg_overlap,
        hard_thresh=s.hard_thresh,
        easy_thresh=s.easy_thresh,
        retrain_limit=s.retrain_limit,
    )
    regressor = bbox.fit(k, feature_scale=bbox_scale) if config.bbox_reg.enabled else None
    stats: Dict[str, Any] = {"bbox_samples": bbox.num_samples if regressor is not None else 0}
    stats["svm_trained"] = [bool(t) for t in svms.trained.tolist()]
    logger.info("SVMs trained; box regression on %d windows", stats["bbox_samples"])
    if regressor is not None:
        regressor = regressor.to(detector.device)
    return svms.to(detector.device), regressor, stats
