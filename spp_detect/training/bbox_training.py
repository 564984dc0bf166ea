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
from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..config import BBoxRegConfig
from ..modeling.box_regression import BoxRegressor
from ..structures.box_coder import BoxCoder
from ..structures.boxes import matched_box_iou

__all__ = ["BoxRegressionTrainer", "fit_box_regressor", "ridge_solve"]

logger = logging.getLogger(__name__)

# R-CNN / SPP_net whiten the targets with V diag(1 / sqrt(D + 0.001)) V^T (eigen-decomposition
# of the targets' covariance); the 0.001 keeps a degenerate direction finite.
_WHITEN_EPS = 1e-3


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be Tensor[N, 4] xyxy, got shape {tuple(boxes.shape)}")


def ridge_solve(x: Tensor, y: Tensor, lambda_: float, method: str = "auto") -> Tensor:
    """``argmin_B ||x B - y||^2 + lambda_ ||B||^2`` in closed form, in float64.

    Primal: ``(x^T x + lambda I) B = x^T y`` (a D x D Cholesky solve, as R-CNN's
    ``ridge_reg_chol``); dual (kernel) form: ``B = x^T (x x^T + lambda I)^-1 y`` (an N x N
    solve). Both are the same minimiser; "auto" takes the smaller system (the dual for a few
    thousand 12,800-D SPP windows).

    Args:
        x (Tensor[N, D]), y (Tensor[N, T]): any float dtype and device.
        lambda_: positive ridge weight.
        method: "auto", "primal" or "dual".
    Returns:
        Tensor[D, T] float64 on the device of ``x``.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"ridge_solve: need x[N, D], y[N, T], got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if lambda_ <= 0:
        raise ValueError(f"ridge_solve: lambda_ must be positive, got {lambda_}")
    if method not in ("auto", "primal", "dual"):
        raise ValueError(f"ridge_solve: method must be auto, primal or dual, got {method!r}")
    x = x.double()
    y = y.to(device=x.device, dtype=torch.float64)
    n, d = x.shape
    if method == "auto":
        method = "dual" if n < d else "primal"
    if method == "primal":
        gram = x.T @ x
        gram.diagonal().add_(lambda_)
        chol = torch.linalg.cholesky(gram)
        return torch.cholesky_solve(x.T @ y, chol)
    kernel = x @ x.T
    kernel.diagonal().add_(lambda_)
    chol = torch.linalg.cholesky(kernel)
    return x.T @ torch.cholesky_solve(y, chol)


def _solve_with_bias(x: Tensor, y: Tensor, lambda_: float, regularize_bias: bool, method: str):
    """Tensor[D + 1, 4]: ridge weights with the bias in the last row."""
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    if regularize_bias:
        # R-CNN / SPP_net: a constant-1 feature, penalised like the others.
        return ridge_solve(torch.cat([x, ones], dim=1), y, lambda_, method)
    x_mean = x.mean(dim=0)
    w = ridge_solve(x - x_mean, y - y.mean(dim=0), lambda_, method)
    b = y.mean(dim=0) - x_mean @ w
    return torch.cat([w, b[None]], dim=0)


@torch.no_grad()
def fit_box_regressor(
    features: Tensor,
    boxes: Tensor,
    gt_boxes: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    lambda_: float = 4000.0,
    iou_thresh: float = 0.5,
    feature_norm: float = 20.0,
    feature_scale: Optional[float] = None,
    min_samples: int = 10,
    regularize_bias: bool = True,
    whiten_targets: bool = True,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    method: str = "auto",
) -> BoxRegressor:
    """Train every class's regressor in closed form.

    Args:
        features (Tensor[N, D]): features of the windows (SPP-net: pooled conv5, D = C * 50).
        boxes (Tensor[N, 4]): the windows, xyxy in pixels of their image.
        gt_boxes (Tensor[N, 4]): the ground truth each window is matched to (R-CNN: the one
            with the highest IoU), same frame.
        labels (LongTensor[N]): 0-based class of that ground truth.
        num_classes: K.
        lambda_: ridge weight (SPP_net code: 4000; R-CNN: 1000), relative to features scaled to
            a mean norm of ``feature_norm``.
        iou_thresh: only rows with ``IoU(box, gt) > iou_thresh`` are used (SPP_net code: 0.5;
            R-CNN: 0.6; strict as ``O > opts.min_overlap`` in R-CNN).
        feature_norm: features are scaled by one factor so their mean L2 norm is this (R-CNN /
            SPP_net ``*_scale_features``: 20).
        feature_scale: that factor if known; None computes ``feature_norm / mean ||f_i||`` over
            all N rows (R-CNN computes it on a random sample of windows; pass such a value to
            follow it exactly).
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
    Returns:
        A ``BoxRegressor`` on the device of ``features``.
    """
    if lambda_ <= 0:
        raise ValueError(f"fit_box_regressor: lambda_ must be positive, got {lambda_}")
    n = features.shape[0]
    if features.ndim != 2:
        raise ValueError(f"features must be Tensor[N, D], got {tuple(features.shape)}")
    _check_boxes(boxes, "boxes")
    _check_boxes(gt_boxes, "gt_boxes")
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
    min_samples = max(1, int(min_samples))
    d = features.shape[1]
    device = features.device
    if feature_scale is None:
        mean_norm = float(features.double().norm(dim=1).mean()) if n else 0.0
        feature_scale = feature_norm / mean_norm if mean_norm > 0 else 1.0
    k = num_classes
    coder = BoxCoder(weights)
    weight = torch.zeros(k, d + 1, 4, dtype=torch.float64, device=device)
    mean = torch.zeros(k, 4, dtype=torch.float64, device=device)
    transform = torch.eye(4, dtype=torch.float64, device=device).repeat(k, 1, 1)
    trained = torch.zeros(k, dtype=torch.bool, device=device)
    boxes = boxes.to(device)
    gt_boxes = gt_boxes.to(device)
    labels = labels.to(device)
    selected = matched_box_iou(boxes.double(), gt_boxes.double()) > iou_thresh
    for c in range(k):
        idx = torch.nonzero(selected & (labels == c)).flatten()
        if idx.numel() < min_samples:
            logger.warning(
                "box regression: class %d has %d training windows (< %d); it keeps the identity",
                c,
                idx.numel(),
                min_samples,
            )
            continue
        x = features[idx].double() * feature_scale
        y = coder.get_deltas(boxes[idx].double(), gt_boxes[idx].double())
        mu = y.mean(dim=0)
        y = y - mu
        if whiten_targets:
            # R-CNN: centre and decorrelate the targets; predictions are mapped back.
            cov = y.T @ y / y.shape[0]
            evals, evecs = torch.linalg.eigh(cov)
            evals = evals.clamp(min=0) + _WHITEN_EPS
            whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
            transform[c] = evecs @ torch.diag(evals.sqrt()) @ evecs.T
            y = y @ whiten
        weight[c] = _solve_with_bias(x, y, lambda_, regularize_bias, method)
        mean[c] = mu
        trained[c] = True
        logger.info("box regression: class %d trained on %d windows", c, idx.numel())
    regressor = BoxRegressor(k, weights).to(device)
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


class BoxRegressionTrainer:
    """Gathers the regression windows image by image, then fits the regressors.

    Args:
        iou_thresh: a window is a sample when its highest IoU with a ground truth is above this
            (``BBoxRegConfig.iou_thresh``).
        lambda_: ridge weight (``BBoxRegConfig.lambda_``).
        max_per_image: at most this many samples per image, drawn at random (bounds memory on
            large datasets; ours, the papers keep all).
        seed: seed of that draw.
        store_dtype: the samples' features are kept on the CPU in this dtype (float16 halves
            the memory of thousands of 12,800-D windows).
    """

    def __init__(
        self,
        iou_thresh: float = 0.5,
        lambda_: float = 4000.0,
        max_per_image: int = 256,
        seed: int = 0,
        store_dtype: torch.dtype = torch.float16,
    ) -> None:
        if lambda_ <= 0:
            raise ValueError(f"BoxRegressionTrainer: lambda_ must be positive, got {lambda_}")
        self.iou_thresh = float(iou_thresh)
        self.lambda_ = float(lambda_)
        self.max_per_image = int(max_per_image)
        self.store_dtype = store_dtype
        self._generator = torch.Generator().manual_seed(int(seed))
        self._features: List[Tensor] = []
        self._boxes: List[Tensor] = []
        self._gt: List[Tensor] = []
        self._labels: List[Tensor] = []

    @classmethod
    def from_config(cls, config: BBoxRegConfig, **kwargs) -> "BoxRegressionTrainer":
        """A trainer with the IoU threshold and lambda of ``config``."""
        return cls(iou_thresh=config.iou_thresh, lambda_=config.lambda_, **kwargs)

    @property
    def num_samples(self) -> int:
        return sum(int(t.shape[0]) for t in self._labels)

    @torch.no_grad()
    def add_image(
        self, features: Tensor, windows: Tensor, gt_boxes: Tensor, gt_labels: Tensor
    ) -> Tensor:
        """Keep this image's windows that overlap a ground truth by more than ``iou_thresh``.

        Args:
            features (Tensor[R, D]): features of the windows (pooled conv5).
            windows (Tensor[R, 4]): xyxy in pixels of the image.
            gt_boxes (Tensor[G, 4]), gt_labels (LongTensor[G]): the image's ground truths.
        Returns:
            LongTensor: indices of the windows kept (sorted unless subsampled).
        """
        _check_boxes(windows, "windows")
        if features.shape[0] != windows.shape[0]:
            raise ValueError(
                f"features and windows differ in length: {features.shape[0]} vs {windows.shape[0]}"
            )
        if gt_boxes.shape[0] == 0 or windows.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long)
        windows = windows.cpu()
        gt_boxes = gt_boxes.cpu().to(windows.dtype)
        best, match = box_iou(windows, gt_boxes).max(dim=1)
        sel = torch.nonzero(best > self.iou_thresh).flatten()
        if 0 < self.max_per_image < sel.numel():
            pick = torch.randperm(sel.numel(), generator=self._generator)[: self.max_per_image]
            sel = sel[pick]
        self._features.append(features[sel.to(features.device)].to("cpu", self.store_dtype))
        self._boxes.append(windows[sel])
        self._gt.append(gt_boxes[match[sel]])
        self._labels.append(gt_labels.cpu()[match[sel]])
        return sel

    def fit(
        self, num_classes: int, feature_scale: Optional[float] = None, **kwargs
    ) -> Optional[BoxRegressor]:
        """The regressors fitted on every sample so far (``fit_box_regressor``; keywords go to
        it), or None when there is no sample (a detector without regressor keeps its windows).
        """
        if self.num_samples == 0:
            logger.warning("box regression: no training windows; no regressor trained")
            return None
        return fit_box_regressor(
            torch.cat(self._features).float(),
            torch.cat(self._boxes),
            torch.cat(self._gt),
            torch.cat(self._labels),
            num_classes,
            lambda_=self.lambda_,
            iou_thresh=self.iou_thresh,
            feature_scale=feature_scale,
            **kwargs,
        )
