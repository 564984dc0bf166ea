"""Training the box regressors: R-CNN's ridge regression from window features to deltas.

The recipe of the R-CNN / SPP_net code (``rcnn_train_bbox_regressor.m``,
``spp_train_bbox_regressor.m``): a window trains the regressor of the class of the ground truth
it overlaps most, when that IoU is above ``iou_thresh`` (SPP_net code 0.5, R-CNN 0.6); features
are scaled to a mean L2 norm of 20 and get a constant-1 bias feature; targets are centred and
decorrelated (whitened) per class; ridge regression (lambda: SPP_net code 4000, R-CNN 1000) is
solved in closed form. The result is a ``modeling.box_regression.BoxRegressor``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..modeling.box_regression import BoxRegressor
from ..structures.box_coder import BoxCoder
from ..structures.boxes import matched_box_iou
from .ridge import NormalEquations, ridge_memory, ridge_solve_with_bias

__all__ = [
    "fit_box_regressor", "fit_box_regressor_by_class", "scale_from_norms", "check_boxes",
    "FIT_CHUNK_ROWS",
]  # fmt: skip

logger = logging.getLogger(__name__)

# R-CNN / SPP_net whiten the targets with V diag(1 / sqrt(D + 0.001)) V^T (eigen-decomposition
# of the targets' covariance); the 0.001 keeps a degenerate direction finite.
_WHITEN_EPS = 1e-3


def check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be Tensor[N, 4] xyxy, got shape {tuple(boxes.shape)}")


def _check_fit_inputs(
    features: Tensor, boxes: Tensor, gt_boxes: Tensor, labels: Tensor, num_classes: int
) -> None:
    n = features.shape[0]
    if features.ndim != 2:
        raise ValueError(f"features must be Tensor[N, D], got {tuple(features.shape)}")
    check_boxes(boxes, "boxes")
    check_boxes(gt_boxes, "gt_boxes")
    if boxes.shape[0] != n or gt_boxes.shape[0] != n or labels.shape != (n,):
        raise ValueError(
            f"fit: lengths differ: features {n}, boxes {boxes.shape[0]}, gt_boxes "
            f"{gt_boxes.shape[0]}, labels {tuple(labels.shape)}"
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"fit: labels must lie in [0, {num_classes}), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def _whiten(y: Tensor) -> Tuple[Tensor, Tensor]:
    """R-CNN: decorrelate centred targets ``y`` (Tensor[N, 4] float64); returns the whitened
    targets and the 4 x 4 transform that maps predictions back."""
    cov = y.T @ y / y.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp(min=0) + _WHITEN_EPS
    whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return y @ whiten, evecs @ torch.diag(evals.sqrt()) @ evecs.T


def _fit_classes(
    class_rows: Iterable[Tuple[int, Tensor, Tensor, Tensor]],
    k: int,
    d: int,
    device: Any,
    coder: BoxCoder,
    feature_scale: Any,
    *,
    lambda_: float,
    iou_thresh: float,
    min_samples: int,
    regularize_bias: bool,
    whiten_targets: bool,
    method: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every class's ridge fit from ``class_rows``: ``(c, features[N_c, D], boxes, gt_boxes)``
    per class, taken one at a time (``fit_box_regressor``'s other arguments); a class given
    no rows keeps the identity. Returns float64 ``weight[K, D + 1, 4]``, ``target_mean[K, 4]``,
    ``target_transform[K, 4, 4]`` and ``trained`` BoolTensor[K], on ``device``.

    Memory: one class at a time, and for it the smaller of the dual (its rows in float64 and
    the N x N kernel) and the primal (the (D + 1)^2 system, rows streamed in chunks):
    ``_solve_class``.
    """
    weight = torch.zeros(k, d + 1, 4, dtype=torch.float64, device=device)
    mean = torch.zeros(k, 4, dtype=torch.float64, device=device)
    transform = torch.eye(4, dtype=torch.float64, device=device).repeat(k, 1, 1)
    trained = torch.zeros(k, dtype=torch.bool, device=device)
    counts = [0] * k
    for c, features, boxes, gt_boxes in class_rows:
        boxes, gt_boxes = boxes.to(device).double(), gt_boxes.to(device).double()
        keep = matched_box_iou(boxes, gt_boxes) > iou_thresh
        counts[c] = int(keep.sum())
        if counts[c] < min_samples:
            continue
        y = coder.get_deltas(boxes[keep], gt_boxes[keep])
        mu = y.mean(dim=0)
        y = y - mu
        if whiten_targets:
            y, transform[c] = _whiten(y)
        weight[c] = _solve_class(
            features, keep, y, feature_scale, d, device, lambda_, regularize_bias, method
        )
        mean[c] = mu
        trained[c] = True
        logger.info("box regression: class %d trained on %d windows", c, counts[c])
    for c in range(k):
        if not trained[c]:
            logger.warning(
                "box regression: class %d has %d training windows (< %d); it keeps the identity",
                *(c, counts[c], min_samples),
            )
    return weight, mean, transform, trained


# Rows per chunk when a class's features are streamed (the primal fit's normal equations, the
# rows read back from disk): 1,024 x 5,600 float16 is 11 MB.
FIT_CHUNK_ROWS = 1024


def _row_chunks(features) -> Iterable[Tensor]:
    """A class's feature rows in order, ``FIT_CHUNK_ROWS`` at a time: from a Tensor, or from
    a callable ``rows -> iterator of chunks`` (``bbox_training``'s rows read back from disk)."""
    if callable(features):
        yield from features(FIT_CHUNK_ROWS)
        return
    for start in range(0, features.shape[0], FIT_CHUNK_ROWS):
        yield features[start : start + FIT_CHUNK_ROWS]


def _solve_class(
    features, keep, y, feature_scale, d, device, lambda_, regularize_bias, method
) -> Tensor:
    """One class's ridge weights ``Tensor[D + 1, 4]`` from its rows ``features[keep]`` times
    ``feature_scale`` and its targets ``y``. "auto" takes the solver that holds less memory
    (``ridge.ridge_memory``): the dual (rows in float64 and the N x N kernel) for few rows,
    else the primal from normal equations summed over chunks of rows, whose (D + 1)^2 system
    does not grow with the number of rows (issue 10: a flat peak)."""
    n = int(keep.sum())
    if method == "auto":
        method = min(("dual", "primal"), key=lambda m: ridge_memory(n, d, m))
    keep = keep.cpu()
    if method == "primal":
        normal = NormalEquations(d, y.shape[1], device=device)
        done = 0
        for start, chunk in _offsets(_row_chunks(features)):
            rows = torch.nonzero(keep[start : start + chunk.shape[0]]).flatten()
            if rows.numel():
                x = chunk[rows.to(chunk.device)].to(device=device, dtype=torch.float64)
                normal.add(x.mul_(feature_scale), y[done : done + rows.numel()])
                done += rows.numel()
        return normal.solve(lambda_, regularize_bias)
    x = torch.cat([chunk[keep[i : i + chunk.shape[0]].to(chunk.device)] for i, chunk in
                   _offsets(_row_chunks(features))])  # fmt: skip
    x = x.to(device=device, dtype=torch.float64).mul_(feature_scale)
    return ridge_solve_with_bias(x, y, lambda_, regularize_bias, method)


def _offsets(chunks: Iterable[Tensor]) -> Iterable[Tuple[int, Tensor]]:
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += chunk.shape[0]


def _to_regressor(
    weights: Sequence[float],
    coder: BoxCoder,
    feature_scale: Any,
    weight: Tensor,
    mean: Tensor,
    transform: Tensor,
    trained: Tensor,
) -> BoxRegressor:
    """A ``BoxRegressor`` holding ``_fit_classes``'s float64 results, on their device."""
    device = weight.device
    regressor = BoxRegressor(weight.shape[0], weights).to(device)
    regressor.load_state_dict(
        {
            "weight": weight.float(),
            "target_mean": mean.float(),
            "target_transform": transform.float(),
            "feature_scale": torch.tensor(float(feature_scale), device=device),
            "trained": trained,
            "delta_weights": torch.tensor(coder.weights, device=device),
        }
    )
    return regressor


@torch.no_grad()
def scale_from_norms(norms: Tensor, feature_norm: float = 20.0) -> float:
    """``feature_norm / mean(norms)`` for the L2 norms of the training rows (R-CNN /
    SPP_net ``*_scale_features``); 1.0 when there are none or they are all zero."""
    mean_norm = float(norms.mean()) if norms.numel() else 0.0
    return feature_norm / mean_norm if mean_norm > 0 else 1.0


def fit_box_regressor(
    features: Tensor,
    boxes: Tensor,
    gt_boxes: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    feature_norm: float = 20.0,
    feature_scale: Optional[float] = None,
    **options: Any,
) -> BoxRegressor:
    """Train every class's regressor in closed form.

    Args:
        features (Tensor[N, D]): features of the windows (SPP-net: pooled conv5, D = C * 50).
        boxes (Tensor[N, 4]): the windows, xyxy in pixels of their image.
        gt_boxes (Tensor[N, 4]): the ground truth each window is matched to (R-CNN: the one
            with the highest IoU), same frame.
        labels (LongTensor[N]): 0-based class of that ground truth.
        num_classes: K.
        feature_norm: features are scaled by one factor so their mean L2 norm is this (R-CNN /
            SPP_net ``*_scale_features``: 20).
        feature_scale: that factor if known; None computes ``feature_norm / mean ||f_i||`` over
            all N rows (R-CNN computes it on a random sample of windows; pass such a value to
            follow it exactly).
        options: the fit's settings (``lambda_``, ``iou_thresh``, ``min_samples``,
            ``regularize_bias``, ``whiten_targets``, ``weights``, ``method``): see
            ``fit_box_regressor_by_class``.
    Returns:
        A ``BoxRegressor`` on the device of ``features``.
    """
    _check_fit_inputs(features, boxes, gt_boxes, labels, num_classes)
    if feature_scale is None:
        feature_scale = scale_from_norms(features.double().norm(dim=1), feature_norm)
    labels = labels.to(features.device)
    rows = (
        (c, features[m], boxes[m.to(boxes.device)], gt_boxes[m.to(gt_boxes.device)])
        for c, m in ((c, labels == c) for c in range(num_classes))
    )
    return fit_box_regressor_by_class(
        rows, num_classes, features.shape[1], feature_scale, device=features.device, **options
    )


def fit_box_regressor_by_class(
    class_rows: Iterable[Tuple[int, Tensor, Tensor, Tensor]],
    num_classes: int,
    feature_dim: int,
    feature_scale: float,
    *,
    device: Any = "cpu",
    lambda_: float = 4000.0,
    iou_thresh: float = 0.5,
    min_samples: int = 10,
    regularize_bias: bool = True,
    whiten_targets: bool = True,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    method: str = "auto",
) -> BoxRegressor:
    """``fit_box_regressor`` from each class's rows, one class at a time, so that the rows of
    all classes are never copied together (the box-regression trainer keeps them per class).

    Args:
        class_rows: ``(class, features, boxes[N_c, 4], gt_boxes[N_c, 4])`` per class, the
            features a Tensor[N_c, D] or a callable ``rows -> chunks of them`` (``_row_chunks``),
            with training windows (a generator is consumed once); the others keep the identity.
        feature_dim: D. feature_scale: the factor the features are multiplied by.
        device: where the fit runs and the regressor lives.
        lambda_: ridge weight (SPP_net code: 4000; R-CNN: 1000), relative to features scaled to
            a mean norm of 20.
        iou_thresh: only rows with ``IoU(box, gt) > iou_thresh`` are used (SPP_net code: 0.5;
            R-CNN: 0.6; strict as ``O > opts.min_overlap`` in R-CNN).
        min_samples: a class with fewer training windows keeps the identity (zero deltas) and a
            warning is logged (ours, not the papers': with a handful of windows the fit would
            shift every window by their mean delta).
        regularize_bias: True penalises the bias weight like every other weight, as R-CNN and
            SPP_net do (they append a constant-1 feature); False leaves it free (solved on
            centred features). The targets are centred first, so the two barely differ.
        whiten_targets: centre and decorrelate the targets per class (R-CNN); False only
            centres them.
        weights: ``(wx, wy, ww, wh)`` of the ``BoxCoder`` (1 in R-CNN).
        method: ridge solver, "auto" (dual when N_c < D + 1), "primal" or "dual".
    """
    if lambda_ <= 0:
        raise ValueError(f"fit_box_regressor: lambda_ must be positive, got {lambda_}")
    coder = BoxCoder(weights)
    weight, mean, transform, trained = _fit_classes(
        class_rows, num_classes, feature_dim, device, coder, feature_scale,
        lambda_=lambda_, iou_thresh=iou_thresh, min_samples=max(1, int(min_samples)),
        regularize_bias=regularize_bias, whiten_targets=whiten_targets, method=method,
    )  # fmt: skip
    return _to_regressor(weights, coder, feature_scale, weight, mean, transform, trained)
