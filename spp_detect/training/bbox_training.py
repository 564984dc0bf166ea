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
from typing import Any, Dict, List, Optional, Sequence

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

    Memory is bounded twice (ours; the papers keep every window): at most ``max_per_image``
    windows per image, drawn at random, and at most ``max_samples`` per class over the whole
    set, a uniform sample of every window the class was offered (reservoir sampling, Vitter's
    algorithm R: the t-th window replaces a random kept one with probability cap / t). Below
    both caps every window is kept, per class in image order, and the fit is the uncapped one.

    Args:
        iou_thresh: a window is a sample when its highest IoU with a ground truth is above this
            (``BBoxRegConfig.iou_thresh``).
        lambda_: ridge weight (``BBoxRegConfig.lambda_``).
        max_per_image: at most this many samples per image (0: no cap).
        max_samples: at most this many samples per class (0: no cap).
        seed: seed of both draws.
        store_dtype: the samples' features are kept on the CPU in this dtype (float16 halves
            the memory of thousands of 12,800-D windows).
    """

    def __init__(
        self,
        iou_thresh: float = 0.5,
        lambda_: float = 4000.0,
        max_per_image: int = 256,
        max_samples: int = 0,
        seed: int = 0,
        store_dtype: torch.dtype = torch.float16,
    ) -> None:
        if lambda_ <= 0:
            raise ValueError(f"BoxRegressionTrainer: lambda_ must be positive, got {lambda_}")
        if max_per_image < 0 or max_samples < 0:
            raise ValueError(
                f"BoxRegressionTrainer: caps must be >= 0, got max_per_image={max_per_image}, "
                f"max_samples={max_samples}"
            )
        self.iou_thresh = float(iou_thresh)
        self.lambda_ = float(lambda_)
        self.max_per_image = int(max_per_image)
        self.max_samples = int(max_samples)
        self.store_dtype = store_dtype
        self._generator = torch.Generator().manual_seed(int(seed))
        # Per class: chunks of (features, windows, matched ground truths), in arrival order,
        # and how many windows the class was offered (the reservoir's t).
        self._features: Dict[int, List[Tensor]] = {}
        self._boxes: Dict[int, List[Tensor]] = {}
        self._gt: Dict[int, List[Tensor]] = {}
        self._seen: Dict[int, int] = {}

    @classmethod
    def from_config(cls, config: BBoxRegConfig, **kwargs) -> "BoxRegressionTrainer":
        """A trainer with the IoU threshold, lambda and caps of ``config`` (keywords win)."""
        fields = dict(
            iou_thresh=config.iou_thresh,
            lambda_=config.lambda_,
            max_per_image=config.max_per_image,
            max_samples=config.max_samples,
        )
        fields.update(kwargs)
        return cls(**fields)

    @property
    def num_samples(self) -> int:
        return sum(self.class_samples(c) for c in self._features)

    def class_samples(self, c: int) -> int:
        """Samples kept for class ``c``."""
        return sum(int(t.shape[0]) for t in self._features.get(c, []))

    def offered(self, c: int) -> int:
        """Windows offered to class ``c`` so far (kept or not)."""
        return self._seen.get(c, 0)

    @torch.no_grad()
    def add_image(
        self, features: Tensor, windows: Tensor, gt_boxes: Tensor, gt_labels: Tensor
    ) -> Tensor:
        """Offer this image's windows that overlap a ground truth by more than ``iou_thresh``.

        Args:
            features (Tensor[R, D]): features of the windows (pooled conv5).
            windows (Tensor[R, 4]): xyxy in pixels of the image.
            gt_boxes (Tensor[G, 4]), gt_labels (LongTensor[G]): the image's ground truths.
        Returns:
            LongTensor: indices of the windows offered after the per-image cap (sorted unless
            subsampled); the per-class cap may drop some of them later.
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
        feats = features[sel.to(features.device)].to("cpu", self.store_dtype)
        labels = gt_labels.cpu()[match[sel]]
        for c in torch.unique(labels).tolist():  # ascending: a fixed order of the draws
            rows = torch.nonzero(labels == c).flatten()
            self._offer(c, feats[rows], windows[sel[rows]], gt_boxes[match[sel[rows]]])
        return sel

    def _offer(self, c: int, feats: Tensor, boxes: Tensor, gt: Tensor) -> None:
        """Keep what fits below the cap; the rest goes through the reservoir."""
        for store in (self._features, self._boxes, self._gt):
            store.setdefault(c, [])
        seen = self._seen.get(c, 0)
        self._seen[c] = seen + feats.shape[0]
        room = feats.shape[0] if self.max_samples == 0 else self.max_samples - seen
        room = max(0, min(room, feats.shape[0]))
        if room:
            self._features[c].append(feats[:room])
            self._boxes[c].append(boxes[:room])
            self._gt[c].append(gt[:room])
        extra = feats.shape[0] - room
        if extra == 0:
            return
        # Algorithm R: window number t (1-based, over the class) replaces slot j, j uniform in
        # [0, t), when j < cap. Later windows overwrite earlier ones, as in the sequential rule.
        for store in (self._features, self._boxes, self._gt):
            store[c] = [torch.cat(store[c])]
        t = torch.arange(seen + room + 1, seen + feats.shape[0] + 1, dtype=torch.float64)
        u = torch.rand(extra, generator=self._generator, dtype=torch.float64)
        slots = (u * t).floor().long().tolist()
        last = {}
        for i, j in enumerate(slots):
            if j < self.max_samples:
                last[j] = room + i
        if last:
            slot = torch.tensor(list(last.keys()))
            src = torch.tensor(list(last.values()))
            self._features[c][0][slot] = feats[src]
            self._boxes[c][0][slot] = boxes[src]
            self._gt[c][0][slot] = gt[src]

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue (plain types and tensors, for ``save_file``)."""
        classes = sorted(self._features)
        for store in (self._features, self._boxes, self._gt):
            for c in classes:
                if len(store[c]) > 1:
                    store[c] = [torch.cat(store[c])]
        return {
            "classes": classes,
            "features": [self._features[c][0] if self._features[c] else None for c in classes],
            "boxes": [self._boxes[c][0] if self._boxes[c] else None for c in classes],
            "gt": [self._gt[c][0] if self._gt[c] else None for c in classes],
            "seen": [self._seen[c] for c in classes],
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state_dict()``."""
        self._features, self._boxes, self._gt, self._seen = {}, {}, {}, {}
        for i, c in enumerate(state["classes"]):
            for store, name in ((self._features, "features"), (self._boxes, "boxes"),
                                (self._gt, "gt")):  # fmt: skip
                t = state[name][i]
                store[c] = [] if t is None else [t]
            self._seen[c] = int(state["seen"][i])
        self._generator.set_state(state["generator"])

    def fit(
        self, num_classes: int, feature_scale: Optional[float] = None, **kwargs
    ) -> Optional[BoxRegressor]:
        """The regressors fitted on every sample kept (``fit_box_regressor``; keywords go to
        it), or None when there is no sample (a detector without regressor keeps its windows).
        """
        if self.num_samples == 0:
            logger.warning("box regression: no training windows; no regressor trained")
            return None
        classes = [c for c in sorted(self._features) if self.class_samples(c)]
        for c in classes:
            if self.offered(c) > self.class_samples(c):
                logger.info(
                    "box regression: class %d keeps a uniform sample of %d of its %d windows",
                    c,
                    self.class_samples(c),
                    self.offered(c),
                )
        labels = [torch.full((self.class_samples(c),), c, dtype=torch.long) for c in classes]
        # Features stay in their storage dtype: the fit converts one class at a time to float64.
        return fit_box_regressor(
            torch.cat([t for c in classes for t in self._features[c]]),
            torch.cat([t for c in classes for t in self._boxes[c]]),
            torch.cat([t for c in classes for t in self._gt[c]]),
            torch.cat(labels),
            num_classes,
            lambda_=self.lambda_,
            iou_thresh=self.iou_thresh,
            feature_scale=feature_scale,
            **kwargs,
        )
