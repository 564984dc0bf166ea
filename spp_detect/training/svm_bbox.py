"""Stages 2 and 3 of detector training, in one pass over the training images:

- per-class linear SVMs on fc7 with one pass of hard negative mining (R-CNN / SPP-net;
  ``training/hard_negatives.py``, ``training/svm_solver.py``);
- per-class ridge box regressors on the pooled conv features of windows that overlap a ground
  truth (SPP_net code: IoU > 0.5, lambda 4000; ``training/bbox_training.py``,
  ``training/bbox_fit.py``).

At VOC or COCO size the pass takes hours, so it is bounded and resumable (issue 10): each
class's negative cache and regression samples have caps (``svm.max_cached_negatives``,
``bbox_reg.max_samples``), and the whole state (SVMs, caches, retrain counters, regression
samples and their RNG, the next image) is checkpointed every ``svm.checkpoint_seconds`` at an
image boundary, keyed by the fine-tuned head, the backbone, the training windows and the
settings. A run killed at any point (``kill -9``) and started again ends with the SVMs and
regressors of an uninterrupted run.

Under ``torchrun`` the classes are divided among the ranks (``distributed.shard`` over the K
classes): each rank mines, retrains, samples and fits its own classes in its own resumable pass
(``svm_checkpoint_path``), and rank 0 gathers the parts into the SVMs and regressors of one
process, value for value (every step of a class depends on that class's data only).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou
from tqdm import tqdm

from spp_detect import distributed as dist
from spp_detect.config import DetectorConfig
from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.modeling.svm import LinearSVMs, mean_norm_scale
from spp_detect.training.bbox_training import BoxRegressionTrainer
from spp_detect.training.finetune import TrainingImage
from spp_detect.training.hard_negatives import HardNegativeMiner
from spp_detect.training.sample_store import spill_folder
from spp_detect.training.svm_checkpoint import SVMStageCheckpoint, stage_key, svm_checkpoint_path
from spp_detect.training.svm_solver import SVMSolver
from spp_detect.training.window_features import all_rows

__all__ = [
    "train_svms_and_regressors",
    "train_class_subset",
    "merge_class_parts",
    "class_ious",
    "SVMStageCheckpoint",
    "stage_key",
    "svm_checkpoint_path",
]

logger = logging.getLogger(__name__)

# Windows per image sampled to set the SVM feature scale (R-CNN samples random windows).
_SCALE_SAMPLE_IMAGES = 20
_SCALE_SAMPLE_WINDOWS = 200


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


def positive_subset(
    images: Sequence[TrainingImage], cap: int, seed: int, classes: Optional[Sequence[int]] = None
) -> list:
    """Per image, the indices of the ground truths that are SVM positives: all of them, except
    that a class with more than ``cap`` objects (``svm.max_positives``; 0: no cap) keeps a
    uniform random sample of ``cap``, drawn by a generator seeded with ``(seed, class)`` so a
    class's sample does not depend on the others (torchrun divides the classes). With
    ``classes``, only those classes' ground truths."""
    labels = [im.gt_labels.cpu() for im in images]
    owners: Dict[int, list] = {}  # class -> [(image, gt)] in image order
    for i, lab in enumerate(labels):
        for j, c in enumerate(lab.tolist()):
            if classes is None or c in classes:
                owners.setdefault(c, []).append((i, j))
    keep: list = [[] for _ in images]
    for c, objs in sorted(owners.items()):
        if 0 < cap < len(objs):
            state = np.random.SeedSequence([seed, c]).generate_state(1, np.uint64)[0]
            g = torch.Generator().manual_seed(int(state >> np.uint64(1)))
            pick = torch.randperm(len(objs), generator=g)[:cap].sort().values.tolist()
            objs = [objs[p] for p in pick]
        for i, j in objs:
            keep[i].append(j)
    return [torch.tensor(sorted(k), dtype=torch.long) for k in keep]


def _first_pass(detector, source, images, config: DetectorConfig, classes=None):
    """The SVM positives' fc7 (every ground truth, or ``positive_subset``'s sample of a class
    with more than ``svm.max_positives``; given up front as in R-CNN so no class mines against
    a zero model for long) and a random sample of windows to set the feature scales (R-CNN
    scales features to a mean norm of 20 measured on random windows).

    Returns:
        ``(positives (features, labels), fc7 sample, bbox feature scale)``.
    """
    rng = np.random.default_rng(config.finetune.seed)
    chosen = positive_subset(images, config.svm.max_positives, config.finetune.seed, classes)
    pos_feats, pos_labels, fc7_sample, pooled_sample = [], [], [], []
    for i, im in enumerate(tqdm(images, desc="SVM positives", unit="img", leave=False)):
        idx = chosen[i]
        g = idx.numel()
        if i < _SCALE_SAMPLE_IMAGES:
            n = im.windows.shape[0]
            extra = rng.choice(n, size=min(n, _SCALE_SAMPLE_WINDOWS), replace=False)
            idx = torch.cat([idx, torch.from_numpy(extra).long()])
        if idx.numel() == 0:
            continue
        pooled = source.rows(i, idx)
        feats = _fc7(detector, pooled)
        pos_feats.append(feats[:g])
        pos_labels.append(im.gt_labels[chosen[i]].to(feats.device))
        fc7_sample.append(feats[g:])
        pooled_sample.append(pooled[g:])
    positives = (torch.cat(pos_feats), torch.cat(pos_labels))
    bbox_scale = mean_norm_scale(torch.cat(pooled_sample), config.svm.feature_norm)
    return positives, torch.cat(fc7_sample), bbox_scale


def _make_miner(svms: LinearSVMs, s: Any, classes: Sequence[int]) -> HardNegativeMiner:
    """The hard negative miner of ``classes`` of ``svms`` with the settings ``s``
    (``config.svm``)."""
    return HardNegativeMiner(
        svms,
        solver=SVMSolver(C=s.C, pos_weight=s.pos_weight, bias_multiplier=s.bias_multiplier),
        neg_iou_thresh=s.neg_iou_thresh,
        dedup_negatives=s.dedup_negatives,
        neg_overlap=s.neg_overlap,
        hard_thresh=s.hard_thresh,
        easy_thresh=s.easy_thresh,
        retrain_limit=s.retrain_limit,
        max_cached_negatives=s.max_cached_negatives,
        classes=classes,
    )


def _add_image(
    detector,
    source,
    im: TrainingImage,
    i: int,
    miner: HardNegativeMiner,
    bbox: BoxRegressionTrainer,
    config: DetectorConfig,
) -> float:
    """Image ``i`` into the miner and (when enabled) the box regression samples; returns the
    seconds spent on box regression."""
    k = detector.num_classes
    bbox_seconds = 0.0
    pooled = all_rows(source, i)
    feats = _fc7(detector, pooled)
    windows = im.windows.to(feats.device)
    g = im.gt_boxes.shape[0]
    is_gt = torch.zeros(windows.shape[0], dtype=torch.bool, device=feats.device)
    is_gt[:g] = True
    ious = class_ious(windows, im.gt_boxes, im.gt_labels, k)
    if config.bbox_reg.enabled:
        t = time.perf_counter()
        bbox.add_image(pooled, windows, im.gt_boxes, im.gt_labels)
        bbox_seconds += time.perf_counter() - t
    miner.add_image(feats, ious, is_gt, im.gt_labels.to(feats.device), windows)
    return bbox_seconds


def train_svms_and_regressors(
    detector,
    source,
    images: Sequence[TrainingImage],
    config: DetectorConfig,
    checkpoint_path: Optional[Union[str, Path]] = None,
) -> Tuple[Optional[LinearSVMs], Optional[BoxRegressor], Dict[str, Any]]:
    """Train the SVMs and box regressors of ``detector`` (head in eval mode).

    Under torchrun each rank trains the classes ``distributed.shard(range(K))`` gives it
    (``train_class_subset``) and rank 0 assembles them (``merge_class_parts``). Every rank
    still passes over every image and computes its fc7 (hard negative mining is sequential
    over the images, so the pass cannot be split by image); what is divided is the mining,
    the negative caches, the retrains, the regression samples and the fits.

    Args:
        detector: a ``WindowDetector`` whose head has been fine-tuned (the same on every rank).
        source: training window features prepared on ``images`` (``rows(i, idx)``).
        images: ground truths first, then proposals, per image.
        checkpoint_path: where this process's pass checkpoints itself (None: nowhere;
            ``svm_checkpoint_path`` names one per rank); a checkpoint with the same inputs is
            continued, and removed once rank 0 holds every class.
    Returns:
        ``(svms, bbox_regressor, stats)``; the regressor is None when ``config.bbox_reg`` is
        disabled or no window overlaps a ground truth enough. On ranks other than 0:
        ``(None, None, stats of its own classes)``.
    """
    k = detector.num_classes
    classes = dist.shard(list(range(k)))
    with dist.all_ranks_ok("SVMs and box regressors"):
        part, ckpt = train_class_subset(detector, source, images, config, classes, checkpoint_path)
    parts = dist.gather(part)
    ckpt.remove()
    if parts is None:
        return None, None, part["stats"]
    svms, regressor, stats = merge_class_parts(parts, k, config.svm.feature_norm)
    logger.info("SVMs trained; box regression on %d windows", stats["bbox_samples"])
    if regressor is not None:
        regressor = regressor.to(detector.device)
    return svms.to(detector.device), regressor, stats


def train_class_subset(
    detector,
    source,
    images: Sequence[TrainingImage],
    config: DetectorConfig,
    classes: Sequence[int],
    checkpoint_path: Optional[Union[str, Path]] = None,
) -> Tuple[Dict[str, Any], SVMStageCheckpoint]:
    """The pass of ``train_svms_and_regressors`` for ``classes`` only (the others are not
    mined, cached, sampled or fitted).

    Returns:
        ``(part, checkpoint)``: ``part`` holds ``classes``, the state dicts of ``svms`` and of
        the regressor (None without one; K rows each, the rows of ``classes`` trained) and
        ``stats``; the checkpoint is still on disk (``remove()`` it once the part is safe).
    """
    detector.eval()
    k = detector.num_classes
    s = config.svm
    miner = _make_miner(LinearSVMs(k, feature_norm=s.feature_norm), s, classes)
    # With a checkpoint, the regression samples' features go to disk beside it (and its
    # snapshots are what the checkpoint names): the pass's memory no longer grows with them.
    spill = spill_folder(checkpoint_path)
    bbox = BoxRegressionTrainer.from_config(
        config.bbox_reg, seed=config.finetune.seed, classes=classes, spill_dir=spill
    )
    key = stage_key(detector, images, config, classes) if checkpoint_path is not None else ""
    ckpt = SVMStageCheckpoint(checkpoint_path, key, s.checkpoint_seconds, extra=spill)
    state = ckpt.load()
    if state is not None and not bbox.can_load(state["bbox"]):
        logger.warning("%s: its box-regression samples are missing; SVM training starts over",
                       checkpoint_path)  # fmt: skip
        state = None
    if state is not None:
        miner.load_state_dict(state["miner"])
        bbox.load_state_dict(state["bbox"])
        bbox_scale = float(state["bbox_scale"])
        start = int(state["next_image"])
        logger.info("SVM training: resuming at image %d of %d", start, len(images))
    else:
        positives, fc7_sample, bbox_scale = _first_pass(detector, source, images, config, classes)
        miner.svms.set_feature_scale(fc7_sample)
        miner.add_positives(*positives)
        start = 0

    def state_fn() -> Dict[str, Any]:
        return dict(
            miner=miner.state_dict(),
            bbox=bbox.state_dict(),
            bbox_scale=bbox_scale,
            next_image=next_image,
        )

    next_image = start
    bbox_seconds = 0.0
    if state is None:
        ckpt.maybe_save(state_fn, force=True)  # the positives: a whole pass over the images
    bar = tqdm(total=len(images), initial=start, desc="SVM mining + bbox", unit="img", leave=False)
    for i in range(start, len(images)):
        bbox_seconds += _add_image(detector, source, images[i], i, miner, bbox, config)
        next_image = i + 1
        ckpt.maybe_save(state_fn)
        bar.update(1)
    bar.close()
    svms = miner.finish()
    t = time.perf_counter()
    regressor = bbox.fit(k, feature_scale=bbox_scale) if config.bbox_reg.enabled else None
    # This process's time in box regression (sampling and fit); the rest of the pass (reading
    # the features included) is the SVMs'.
    stats: Dict[str, Any] = {"bbox_reg_seconds": bbox_seconds + time.perf_counter() - t}
    stats["bbox_samples"] = bbox.num_samples if regressor is not None else 0
    stats["bbox_in_memory"] = spill is None  # else on disk until the checkpoint goes
    stats["svm_cache_sizes"] = [miner.cache_size(c) for c in range(k)]
    stats["resumed_at_image"] = start
    part = {
        "classes": list(classes),
        "svms": {n: v.detach().cpu() for n, v in svms.state_dict().items()},
        "regressor": None,
        "stats": stats,
    }
    if regressor is not None:
        part["regressor"] = {n: v.detach().cpu() for n, v in regressor.state_dict().items()}
    return part, ckpt


def merge_class_parts(
    parts: Sequence[Dict[str, Any]], num_classes: int, feature_norm: float
) -> Tuple[LinearSVMs, Optional[BoxRegressor], Dict[str, Any]]:
    """The SVMs, regressor and statistics of one process from ``train_class_subset`` parts
    whose classes together are every class once: each class's rows come from its part (the
    feature scales and dimensions are the same in every part). On the CPU."""
    svms = LinearSVMs(num_classes, feature_norm=feature_norm)
    svms.load_state_dict(parts[0]["svms"])
    fitted = [p["regressor"] for p in parts if p["regressor"] is not None]
    # Untrained rows of a part are the identity, as a class without samples in the full fit.
    regressor = BoxRegressor.from_state_dict(fitted[0]) if fitted else None
    cache_sizes = [0] * num_classes
    for part in parts:
        idx = torch.tensor(part["classes"], dtype=torch.long)
        for name in ("weight", "bias", "trained"):
            getattr(svms, name)[idx] = part["svms"][name][idx]
        if part["regressor"] is not None:
            for name in ("weight", "target_mean", "target_transform", "trained"):
                getattr(regressor, name)[idx] = part["regressor"][name][idx]
        for c in part["classes"]:
            cache_sizes[c] = part["stats"]["svm_cache_sizes"][c]
    stats: Dict[str, Any] = {
        "bbox_samples": sum(p["stats"]["bbox_samples"] for p in parts),
        # The slowest rank's (the wall time of the stage's regression share).
        "bbox_reg_seconds": max(p["stats"]["bbox_reg_seconds"] for p in parts),
        "svm_trained": [bool(t) for t in svms.trained.tolist()],
        "svm_cache_sizes": cache_sizes,
        "resumed_at_image": min(p["stats"]["resumed_at_image"] for p in parts),
        "bbox_in_memory": any(p["stats"].get("bbox_in_memory", True) for p in parts),
    }
    return svms, regressor, stats
