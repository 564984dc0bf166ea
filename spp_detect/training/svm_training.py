"""Training the per-class linear SVMs in one call: liblinear (``svm_solver.py``) inside R-CNN's
hard negative mining (``hard_negatives.py``), SPP-net sec. 4.1.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

from torch import Tensor

from ..modeling.svm import LinearSVMs
from .hard_negatives import HardNegativeMiner, MiningImage
from .svm_solver import SVMSolver

__all__ = ["train_svms"]


ImageItem = Union[MiningImage, Sequence[Any], Dict[str, Any]]


def train_svms(
    images: Iterable[ImageItem],
    num_classes: int,
    positives: Optional[Tuple[Tensor, Tensor]] = None,
    feature_scale: Optional[Union[float, Tensor]] = None,
    *,
    solver: Optional[SVMSolver] = None,
    feature_norm: float = 20.0,
    neg_iou_thresh: float = 0.3,
    dedup_negatives: bool = True,
    neg_overlap: float = 0.7,
    hard_thresh: float = -1.0001,
    easy_thresh: float = -1.2,
    retrain_limit: int = 2000,
    max_cached_negatives: int = 0,
) -> LinearSVMs:
    """Train K SVMs with one pass of hard negative mining.

    Args:
        images: per image a ``MiningImage``, a tuple in its field order, or a dict of its fields.
        num_classes: K.
        positives: ``(features Tensor[P, D], labels LongTensor[P])`` of every ground truth, given
            up front as R-CNN does; None takes them from the images as they come.
        feature_scale: a float or a sample ``Tensor[N, D]`` of training features; None uses the
            first image's windows.
        solver: liblinear's settings (R-CNN's by default).
        Other keywords: see ``LinearSVMs`` and ``HardNegativeMiner`` (paper defaults).
    Returns:
        The trained ``LinearSVMs``.
    """
    svms = LinearSVMs(num_classes, feature_norm=feature_norm)
    if feature_scale is not None:
        svms.set_feature_scale(feature_scale)
    miner = HardNegativeMiner(
        svms,
        solver=solver,
        neg_iou_thresh=neg_iou_thresh,
        dedup_negatives=dedup_negatives,
        neg_overlap=neg_overlap,
        hard_thresh=hard_thresh,
        easy_thresh=easy_thresh,
        retrain_limit=retrain_limit,
        max_cached_negatives=max_cached_negatives,
    )
    if positives is not None:
        miner.add_positives(*positives)
    for item in images:
        if isinstance(item, dict):
            miner.add_image(**item)
        else:
            miner.add_image(*item)
    return miner.finish()
