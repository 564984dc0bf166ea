"""Bounding-box regression: R-CNN's box parameterisation and a per-class ridge regressor.

SPP-net (sec. 4.1, "we also use the bounding box regression of R-CNN") regresses, per class, from
the pooled conv5 features of a window to the correction that moves it onto its ground truth.

Parameterisation (R-CNN appendix C), in the continuous frame of ``spp_detect.structures.boxes``
(``w = x2 - x1``, centre ``x1 + w / 2``, no ``+1``)::

    dx = (gx - px) / pw      dy = (gy - py) / ph      dw = log(gw / pw)      dh = log(gh / ph)

The regressor follows the R-CNN / SPP_net code (``rcnn_train_bbox_regressor.m``,
``spp_train_bbox_regressor.m``): features scaled to a mean L2 norm of 20, a constant-1 bias feature,
targets centred and decorrelated (whitened) per class, ridge regression in closed form.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..structures.boxes import pairwise_iou
from .state import resize_buffers_to

__all__ = ["get_deltas", "apply_deltas", "ridge_solve", "BoxRegressor", "DEFAULT_SCALE_CLAMP"]

logger = logging.getLogger(__name__)

# Largest dw / dh applied: a box may grow at most 1000/16 times. detectron2 and torchvision clamp
# the log-scale deltas to log(1000 / 16) so that exp() cannot overflow on a bad prediction.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

# R-CNN / SPP_net whiten the targets with V diag(1 / sqrt(D + 0.001)) V^T (eigen-decomposition
# of the targets' covariance); the 0.001 keeps a degenerate direction finite.
_WHITEN_EPS = 1e-3


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be Tensor[N, 4] xyxy, got shape {tuple(boxes.shape)}")


def get_deltas(src: Tensor, dst: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """The R-CNN regression targets that move ``src`` onto ``dst``.

    Args:
        src (Tensor[N, 4]): windows, xyxy in pixels (any frame shared with ``dst``); widths and
            heights must be positive.
        dst (Tensor[N, 4]): their targets (ground-truth boxes), same frame; positive sizes.
        weights: ``(wx, wy, ww, wh)`` multiply the four deltas (1 in R-CNN / SPP-net).
    Returns:
        Tensor[N, 4]: ``(dx, dy, dw, dh)`` in the dtype of ``src``.
    Raises:
        ValueError: wrong shapes, or a box with a non-positive width or height (log undefined).
    """
    _check_boxes(src, "src")
    _check_boxes(dst, "dst")
    if src.shape[0] != dst.shape[0]:
        raise ValueError(f"src and dst differ in length: {src.shape[0]} vs {dst.shape[0]}")
    dst = dst.to(src.dtype)
    src_w = src[:, 2] - src[:, 0]
    src_h = src[:, 3] - src[:, 1]
    dst_w = dst[:, 2] - dst[:, 0]
    dst_h = dst[:, 3] - dst[:, 1]
    if src.shape[0] and bool(((src_w <= 0) | (src_h <= 0) | (dst_w <= 0) | (dst_h <= 0)).any()):
        raise ValueError("get_deltas: every src and dst box needs a positive width and height")
    src_cx = src[:, 0] + 0.5 * src_w
    src_cy = src[:, 1] + 0.5 * src_h
    dst_cx = dst[:, 0] + 0.5 * dst_w
    dst_cy = dst[:, 1] + 0.5 * dst_h
    wx, wy, ww, wh = (float(v) for v in weights)
    dx = wx * (dst_cx - src_cx) / src_w
    dy = wy * (dst_cy - src_cy) / src_h
    dw = ww * torch.log(dst_w / src_w)
    dh = wh * torch.log(dst_h / src_h)
    return torch.stack([dx, dy, dw, dh], dim=1)


def apply_deltas(
    deltas: Tensor,
    boxes: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> Tensor:
    """Move boxes by R-CNN deltas (the inverse of ``get_deltas``).

    Args:
        deltas (Tensor[N, 4] or Tensor[N, 4K]): ``(dx, dy, dw, dh)``, or K class-specific groups
            laid out ``[dx_0, dy_0, dw_0, dh_0, dx_1, ...]``.
        boxes (Tensor[N, 4]): xyxy in pixels; zero-size boxes stay zero-size (no NaN).
        weights: the ``weights`` given to ``get_deltas``.
        scale_clamp: dw and dh are clamped to at most this (default ``log(1000 / 16)``).
    Returns:
        Tensor of the shape of ``deltas``: xyxy boxes in the frame of ``boxes``, dtype of
        ``deltas``. Not clipped to the image.
    """
    _check_boxes(boxes, "boxes")
    if deltas.ndim != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"deltas must be Tensor[N, 4K] with N = {boxes.shape[0]}, got {tuple(deltas.shape)}"
        )
    if not deltas.is_floating_point():
        raise ValueError(f"deltas must be floating point, got {deltas.dtype}")
    boxes = boxes.to(deltas.dtype)
    widths = (boxes[:, 2] - boxes[:, 0])[:, None]
    heights = (boxes[:, 3] - boxes[:, 1])[:, None]
    ctr_x = boxes[:, 0:1] + 0.5 * widths
    ctr_y = boxes[:, 1:2] + 0.5 * heights
    wx, wy, ww, wh = (float(v) for v in weights)
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=scale_clamp)
    pred_cx = dx * widths + ctr_x
    pred_cy = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    out = torch.stack(
        [
            pred_cx - 0.5 * pred_w,
            pred_cy - 0.5 * pred_h,
            pred_cx + 0.5 * pred_w,
            pred_cy + 0.5 * pred_h,
        ],
        dim=2,
    )
    return out.reshape(deltas.shape)


def ridge_solve(x: Tensor, y: Tensor, lambda_: float, method: str = "auto") -> Tensor:
    """``argmin_B ||x B - y||^2 + lambda_ ||B||^2`` in closed form, in float64.

    Primal: ``(x^T x + lambda I) B = x^T y`` (a D x D Cholesky solve); dual (kernel) form:
    ``B = x^T (x x^T + lambda I)^-1 y`` (an N x N solve). Both are the same minimiser; "auto"
    takes the smaller system (the dual for a few thousand 12,800-D SPP windows).

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


class BoxRegressor(nn.Module):
    """Per-class ridge regression from window features to R-CNN deltas.

    Args:
        num_classes: K object classes (0-based labels, no background).
        lambda_: ridge weight (SPP_net code: 4000; R-CNN: 1000), relative to features scaled to
            a mean norm of ``feature_norm``.
        iou_thresh: a window trains its class's regressor when its IoU with its ground truth is
            above this (SPP_net code: 0.5; R-CNN: 0.6).
        feature_norm: features are scaled by one factor so their mean L2 norm is this (R-CNN /
            SPP_net ``*_scale_features``: 20).
        min_samples: a class with fewer training windows keeps the identity (zero deltas) and a
            warning is logged (ours, not the papers': with a handful of windows the fit would
            shift every window by their mean delta).
        regularize_bias: True penalises the bias weight like every other weight, as R-CNN and
            SPP_net do (they append a constant-1 feature); False leaves it free (solved on
            centred features). The targets are centred first, so the two barely differ.
        whiten_targets: centre and decorrelate the targets per class (R-CNN); False only
            centres them.
        weights: ``(wx, wy, ww, wh)`` of ``get_deltas`` (1 in R-CNN).

    Buffers (``state_dict``): ``weight`` [K, D + 1, 4] (last row: bias), ``target_mean`` [K, 4],
    ``target_transform`` [K, 4, 4] (un-whitening: deltas = y @ T + mean), ``feature_scale`` (),
    ``trained`` [K] bool, ``delta_weights`` [4]. A loaded state may have any D.
    """

    def __init__(
        self,
        num_classes: int,
        lambda_: float = 4000.0,
        iou_thresh: float = 0.5,
        feature_norm: float = 20.0,
        min_samples: int = 10,
        regularize_bias: bool = True,
        whiten_targets: bool = True,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"BoxRegressor: num_classes must be >= 1, got {num_classes}")
        if lambda_ <= 0:
            raise ValueError(f"BoxRegressor: lambda_ must be positive, got {lambda_}")
        self.num_classes = int(num_classes)
        self.lambda_ = float(lambda_)
        self.iou_thresh = float(iou_thresh)
        self.feature_norm = float(feature_norm)
        self.min_samples = max(1, int(min_samples))
        self.regularize_bias = bool(regularize_bias)
        self.whiten_targets = bool(whiten_targets)
        k = self.num_classes
        self.register_buffer("weight", torch.zeros(k, 1, 4))
        self.register_buffer("target_mean", torch.zeros(k, 4))
        self.register_buffer("target_transform", torch.eye(4).repeat(k, 1, 1))
        self.register_buffer("feature_scale", torch.tensor(1.0))
        self.register_buffer("trained", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("delta_weights", torch.tensor([float(v) for v in weights]))

    # -- state ------------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1]) - 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # D is only known after training: take the stored shapes as they come.
        resize_buffers_to(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_state_dict(cls, state: dict, **kwargs) -> "BoxRegressor":
        """A regressor rebuilt from ``state_dict()`` (K and D read from the tensors)."""
        if "weight" not in state:
            raise ValueError("BoxRegressor state has no 'weight' tensor")
        model = cls(int(state["weight"].shape[0]), **kwargs)
        model.load_state_dict(state)
        return model

    # -- training ---------------------------------------------------------------------------
    @torch.no_grad()
    def fit(
        self,
        features: Tensor,
        boxes: Tensor,
        gt_boxes: Tensor,
        labels: Tensor,
        feature_scale: Optional[float] = None,
        method: str = "auto",
    ) -> "BoxRegressor":
        """Train every class's regressor in closed form.

        Args:
            features (Tensor[N, D]): features of the windows (SPP-net: pooled conv5, D = C * 50).
            boxes (Tensor[N, 4]): the windows, xyxy in pixels of their image.
            gt_boxes (Tensor[N, 4]): the ground truth each window is matched to (R-CNN: the one
                with the highest IoU), same frame.
            labels (LongTensor[N]): 0-based class of that ground truth.
            feature_scale: multiply features by this; None computes
                ``feature_norm / mean ||features_i||`` over all N rows given here (R-CNN computes
                it on a random sample of windows; pass such a value to follow it exactly).
            method: ridge solver, "auto" (dual when N_c < D + 1), "primal" or "dual".
        Returns:
            self. Only rows with ``IoU(box, gt) > iou_thresh`` are used.
        """
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
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"fit: labels must lie in [0, {self.num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        d = features.shape[1]
        device = features.device
        if feature_scale is None:
            mean_norm = float(features.double().norm(dim=1).mean()) if n else 0.0
            feature_scale = self.feature_norm / mean_norm if mean_norm > 0 else 1.0
        k = self.num_classes
        weight = torch.zeros(k, d + 1, 4, dtype=torch.float64, device=device)
        mean = torch.zeros(k, 4, dtype=torch.float64, device=device)
        transform = torch.eye(4, dtype=torch.float64, device=device).repeat(k, 1, 1)
        trained = torch.zeros(k, dtype=torch.bool, device=device)
        boxes = boxes.to(device)
        gt_boxes = gt_boxes.to(device)
        labels = labels.to(device)
        selected = pairwise_iou(boxes.double(), gt_boxes.double()) > self.iou_thresh
        for c in range(k):
            idx = torch.nonzero(selected & (labels == c)).flatten()
            if idx.numel() < self.min_samples:
                logger.warning(
                    "box regression: class %d has %d training windows (< %d); "
                    "it keeps the identity",
                    c,
                    idx.numel(),
                    self.min_samples,
                )
                continue
            x = features[idx].double() * feature_scale
            y = get_deltas(boxes[idx].double(), gt_boxes[idx].double(), self.delta_weights.tolist())
            mu = y.mean(dim=0)
            y = y - mu
            if self.whiten_targets:
                # R-CNN: centre and decorrelate the targets; predictions are mapped back.
                cov = y.T @ y / y.shape[0]
                evals, evecs = torch.linalg.eigh(cov)
                evals = evals.clamp(min=0) + _WHITEN_EPS
                whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
                transform[c] = evecs @ torch.diag(evals.sqrt()) @ evecs.T
                y = y @ whiten
            weight[c] = self._solve(x, y, method)
            mean[c] = mu
            trained[c] = True
            logger.info("box regression: class %d trained on %d windows", c, idx.numel())
        self.weight = weight.float()
        self.target_mean = mean.float()
        self.target_transform = transform.float()
        self.feature_scale = torch.tensor(float(feature_scale), device=device)
        self.trained = trained
        self.delta_weights = self.delta_weights.to(device)
        return self

    def _solve(self, x: Tensor, y: Tensor, method: str) -> Tensor:
        """Tensor[D + 1, 4]: ridge weights with the bias in the last row."""
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        if self.regularize_bias:
            # R-CNN / SPP_net: a constant-1 feature, penalised like the others.
            return ridge_solve(torch.cat([x, ones], dim=1), y, self.lambda_, method)
        x_mean = x.mean(dim=0)
        w = ridge_solve(x - x_mean, y - y.mean(dim=0), self.lambda_, method)
        b = y.mean(dim=0) - x_mean @ w
        return torch.cat([w, b[None]], dim=0)

    # -- inference --------------------------------------------------------------------------
    def _check_features(self, features: Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must be Tensor[N, {self.feature_dim}], got {tuple(features.shape)}"
            )

    def predict_deltas(self, features: Tensor) -> Tensor:
        """Deltas of every class.

        Args:
            features (Tensor[N, D]): window features (the same kind as in ``fit``, unscaled).
        Returns:
            Tensor[N, K, 4] in the dtype of ``features`` (float32 for non-float input); zero for
            classes that were not trained.
        """
        self._check_features(features)
        dtype = features.dtype if features.is_floating_point() else torch.float32
        dev = features.device
        k, d = self.num_classes, self.feature_dim
        weight = self.weight.to(device=dev, dtype=dtype)
        # One [N, D] x [D, 4K] product for all classes; the feature scale is folded into the
        # (small) weight matrix instead of a copy of the (large) features.
        w = weight[:, :d, :].permute(1, 0, 2).reshape(d, k * 4)
        w = w * self.feature_scale.to(device=dev, dtype=dtype)
        y = features.to(dtype) @ w
        y = y.reshape(-1, k, 4) + weight[:, d, :]
        y = torch.einsum("nkf,kfg->nkg", y, self.target_transform.to(device=dev, dtype=dtype))
        return y + self.target_mean.to(device=dev, dtype=dtype)

    def predict_all(self, features: Tensor, boxes: Tensor) -> Tensor:
        """Refined boxes for every class.

        Args:
            features (Tensor[N, D]), boxes (Tensor[N, 4]): windows, xyxy in image pixels.
        Returns:
            Tensor[N, K, 4]: xyxy in the frame of ``boxes`` (not clipped).
        """
        _check_boxes(boxes, "boxes")
        deltas = self.predict_deltas(features)
        n = deltas.shape[0]
        out = apply_deltas(
            deltas.reshape(n, 4 * self.num_classes),
            boxes.to(deltas.device),
            self.delta_weights.tolist(),
        )
        return out.reshape(n, self.num_classes, 4)

    def predict(self, features: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        """Each window refined by the regressor of its own class.

        Args:
            features (Tensor[N, D]), boxes (Tensor[N, 4]): xyxy in image pixels.
            labels (LongTensor[N]): 0-based class of each window.
        Returns:
            Tensor[N, 4]: xyxy in the frame of ``boxes`` (not clipped).
        """
        _check_boxes(boxes, "boxes")
        if labels.shape != (boxes.shape[0],):
            raise ValueError(
                f"labels must be LongTensor[{boxes.shape[0]}], got {tuple(labels.shape)}"
            )
        deltas = self.predict_deltas(features)
        rows = torch.arange(deltas.shape[0], device=deltas.device)
        chosen = deltas[rows, labels.to(deltas.device)]
        return apply_deltas(chosen, boxes.to(deltas.device), self.delta_weights.tolist())

    def forward(self, features: Tensor) -> Tensor:
        """Same as ``predict_deltas``: Tensor[N, K, 4]."""
        return self.predict_deltas(features)
