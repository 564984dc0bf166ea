"""One linear SVM per class on fc7 features, trained with R-CNN's hard negative mining.

SPP-net sec. 4.1 follows R-CNN: positives are the ground-truth boxes, negatives are windows that
overlap every positive of the class by less than 0.3, a negative overlapping another negative by
more than 0.7 is removed (SPP-net), and hard negatives are mined in one pass over the training
images. The constants are those of R-CNN's ``rcnn_train.m`` (and SPP_net's ``spp_train.m``):
liblinear ``-s 3`` (L2-regularised L1-loss SVM, solved in the dual) with ``-c 0.001 -w1 2 -B 10``,
features scaled to a mean L2 norm of 20, a negative joins the cache when it scores above -1.0001
and leaves it when it scores below -1.2 after a retrain.

Solver: scikit-learn's ``LinearSVC`` wraps the same liblinear: ``loss="hinge", dual=True`` is
``-s 3``; ``class_weight={1: 2}`` is ``-w1 2``; ``intercept_scaling=10`` is ``-B 10`` (the bias is
a constant feature of value 10 whose weight is regularised like the others, and
``intercept_ = 10 * w_bias`` as R-CNN's ``b = w(end) * bias_mult``).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..structures.boxes import batched_nms
from .state import resize_buffers_to

__all__ = [
    "LinearSVMs",
    "HardNegativeMiner",
    "MiningImage",
    "train_svms",
    "mean_norm_scale",
    "scaled_retrain_every",
    "UNTRAINED_BIAS",
]

logger = logging.getLogger(__name__)

# A class that never saw both positives and negatives scores this everywhere, far below any
# SVM margin, so it never produces a detection.
UNTRAINED_BIAS = -1.0e4

# VOC 2007 trainval, on which R-CNN's "retrain every 2,000" was set.
VOC07_TRAINVAL_IMAGES = 5011


def mean_norm_scale(features: Tensor, target_norm: float = 20.0) -> float:
    """The factor that gives ``features`` a mean L2 norm of ``target_norm``.

    R-CNN ``rcnn_scale_features``: features are multiplied by ``20 / mean norm`` so that one
    range of C works for pool5, fc6 and fc7 features; the mean is taken once, on a random sample
    of training windows (R-CNN: up to 200 windows of up to 200 images).

    Args:
        features (Tensor[N, D]): a sample of training features.
    Returns:
        float; 1.0 when the sample is empty or all zero.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be Tensor[N, D], got {tuple(features.shape)}")
    if features.shape[0] == 0:
        return 1.0
    mean = float(features.double().norm(dim=1).mean())
    return target_norm / mean if mean > 0 else 1.0


def scaled_retrain_every(
    retrain_every: int, num_images: Optional[int], reference_images: int = VOC07_TRAINVAL_IMAGES
) -> int:
    """The retrain interval scaled to a dataset of ``num_images`` images.

    Retraining every 2,000 images of VOC07 trainval (5,011 images) means two retrains per pass
    besides the first and the last model; a smaller dataset keeps that number of retrains
    (``round(retrain_every * num_images / 5011)``, at least 1). Larger datasets keep the value.
    """
    if not num_images or num_images >= reference_images:
        return int(retrain_every)
    return max(1, int(round(retrain_every * num_images / reference_images)))


class LinearSVMs(nn.Module):
    """K one-vs-rest linear SVMs on (scaled) fc7 features.

    Args:
        num_classes: K object classes (0-based labels, no background).
        C: liblinear's C (R-CNN / SPP_net: 0.001, for features of mean norm 20).
        pos_weight: C multiplier of the positives (``-w1 2``).
        bias_multiplier: value of the constant bias feature (``-B 10``).
        feature_norm: target mean L2 norm of the scaled features (20).
        loss: "hinge" (R-CNN's ``-s 3``) or "squared_hinge" (``-s 1``).
        tol, max_iter: liblinear's stopping rule; 0.1 is liblinear's default ``-e`` for ``-s 3``,
            which R-CNN kept (scikit-learn's own default, 1e-4, is several times slower).
        feature_scale: the scale factor if already known; else set by ``set_feature_scale``.
        random_state: seed of liblinear's coordinate order (for reproducible fits).

    Buffers (``state_dict``): ``weight`` [K, D], ``bias`` [K], ``feature_scale`` () (0 until set),
    ``trained`` [K] bool. A loaded state may have any D.
    """

    def __init__(
        self,
        num_classes: int,
        C: float = 0.001,
        pos_weight: float = 2.0,
        bias_multiplier: float = 10.0,
        feature_norm: float = 20.0,
        loss: str = "hinge",
        tol: float = 0.1,
        max_iter: int = 1000,
        feature_scale: Optional[float] = None,
        random_state: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LinearSVMs: num_classes must be >= 1, got {num_classes}")
        if loss not in ("hinge", "squared_hinge"):
            raise ValueError(f"LinearSVMs: loss must be hinge or squared_hinge, got {loss!r}")
        self.num_classes = int(num_classes)
        self.C = float(C)
        self.pos_weight = float(pos_weight)
        self.bias_multiplier = float(bias_multiplier)
        self.feature_norm = float(feature_norm)
        self.loss = loss
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.random_state = int(random_state)
        k = self.num_classes
        self.register_buffer("weight", torch.zeros(k, 0))
        self.register_buffer("bias", torch.zeros(k))
        self.register_buffer("feature_scale", torch.tensor(float(feature_scale or 0.0)))
        self.register_buffer("trained", torch.zeros(k, dtype=torch.bool))

    # -- state ------------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def has_feature_scale(self) -> bool:
        return float(self.feature_scale) > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # D is only known after training: take the stored shapes as they come.
        resize_buffers_to(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_state_dict(cls, state: Dict[str, Tensor], **kwargs: Any) -> "LinearSVMs":
        """SVMs rebuilt from ``state_dict()`` (K and D read from the tensors)."""
        if "weight" not in state:
            raise ValueError("LinearSVMs state has no 'weight' tensor")
        model = cls(int(state["weight"].shape[0]), **kwargs)
        model.load_state_dict(state)
        return model

    def set_feature_scale(self, value: Union[float, Tensor]) -> float:
        """Fix the feature scale: a float, or a sample ``Tensor[N, D]`` to compute it from."""
        if isinstance(value, Tensor):
            value = mean_norm_scale(value, self.feature_norm)
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"feature scale must be a positive finite number, got {value}")
        self.feature_scale = torch.tensor(float(value), device=self.feature_scale.device)
        return float(value)

    def reset_weights(self, feature_dim: int) -> None:
        """Zero weights of dimension D (R-CNN's starting model: every window scores 0)."""
        dev = self.weight.device
        self.weight = torch.zeros(self.num_classes, int(feature_dim), device=dev)
        self.bias = torch.zeros(self.num_classes, device=dev)
        self.trained = torch.zeros(self.num_classes, dtype=torch.bool, device=dev)

    # -- scoring ----------------------------------------------------------------------------
    def scale_features(self, features: Tensor) -> Tensor:
        """``features * feature_scale`` (Tensor[N, D], float)."""
        if not self.has_feature_scale:
            raise ValueError("LinearSVMs: feature scale not set (set_feature_scale or train)")
        dtype = features.dtype if features.is_floating_point() else torch.float32
        return features.to(dtype) * self.feature_scale.to(device=features.device, dtype=dtype)

    def scores(self, features: Tensor) -> Tensor:
        """SVM margins of every window for every class.

        Args:
            features (Tensor[R, D]): fc7 features as the head outputs them (unscaled), any device.
        Returns:
            Tensor[R, K] on the device of ``features``: ``w_k . (s * x) + b_k``.
        """
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must be Tensor[R, {self.feature_dim}], got {tuple(features.shape)}"
            )
        if not self.has_feature_scale:
            raise ValueError("LinearSVMs: feature scale not set (set_feature_scale or train)")
        dtype = features.dtype if features.is_floating_point() else torch.float32
        dev = features.device
        # w . (s x) = (s w) . x: scale the [K, D] weights, not a copy of the [R, D] features.
        w = self.weight.to(device=dev, dtype=dtype) * self.feature_scale.to(device=dev, dtype=dtype)
        return torch.addmm(self.bias.to(device=dev, dtype=dtype), features.to(dtype), w.T)

    def forward(self, features: Tensor) -> Tensor:
        """Same as ``scores``: Tensor[R, K]."""
        return self.scores(features)

    # -- training ---------------------------------------------------------------------------
    def fit_class(self, c: int, positives: Tensor, negatives: Tensor) -> Dict[str, float]:
        """Train class ``c``'s SVM with liblinear on unscaled features.

        Args:
            c: 0-based class index.
            positives (Tensor[P, D]), negatives (Tensor[M, D]): fc7 features (P, M >= 1).
        Returns:
            R-CNN's objective terms: ``pos_loss``, ``neg_loss``, ``reg_loss``, ``total``.
        """
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        if positives.shape[0] == 0 or negatives.shape[0] == 0:
            raise ValueError(
                f"class {c}: an SVM needs positives and negatives, got "
                f"{positives.shape[0]} and {negatives.shape[0]}"
            )
        d = positives.shape[1]
        if negatives.shape[1] != d:
            raise ValueError(f"class {c}: feature sizes differ: {d} vs {negatives.shape[1]}")
        if self.feature_dim != d:
            if bool(self.trained.any()):
                raise ValueError(f"class {c}: features have D={d}, SVMs have {self.feature_dim}")
            self.reset_weights(d)
        scale = float(self.feature_scale)
        x = torch.cat([positives.detach().cpu(), negatives.detach().cpu()]).double().numpy()
        x *= scale
        y = np.concatenate([np.ones(positives.shape[0]), -np.ones(negatives.shape[0])])
        svc = LinearSVC(
            C=self.C,
            loss=self.loss,
            dual=True,
            class_weight={1: self.pos_weight},
            fit_intercept=True,
            intercept_scaling=self.bias_multiplier,
            tol=self.tol,
            max_iter=self.max_iter,
            random_state=self.random_state,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            svc.fit(x, y)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            logger.warning(
                "SVM class %d: liblinear did not converge in %d iterations", c, self.max_iter
            )
        w = torch.from_numpy(svc.coef_[0].copy())
        b = float(svc.intercept_[0])
        self.weight[c] = w.to(self.weight)
        self.bias[c] = b
        self.trained[c] = True
        # The objective R-CNN logs after each update (hinge or squared hinge).
        z = torch.from_numpy(x) @ w + b
        p = positives.shape[0]
        hinge_pos = (1 - z[:p]).clamp(min=0)
        hinge_neg = (1 + z[p:]).clamp(min=0)
        if self.loss == "squared_hinge":
            hinge_pos, hinge_neg = hinge_pos**2, hinge_neg**2
        stats = {
            "pos_loss": self.C * self.pos_weight * float(hinge_pos.sum()),
            "neg_loss": self.C * float(hinge_neg.sum()),
            "reg_loss": 0.5 * float(w @ w) + 0.5 * (b / self.bias_multiplier) ** 2,
        }
        stats["total"] = stats["pos_loss"] + stats["neg_loss"] + stats["reg_loss"]
        return stats

    def mark_untrained(self, c: int) -> None:
        """Class ``c`` keeps zero weights and a bias far below any margin (never detected)."""
        if self.feature_dim:
            self.weight[c] = 0
        self.bias[c] = UNTRAINED_BIAS
        self.trained[c] = False


class MiningImage(NamedTuple):
    """What the hard negative miner needs from one training image.

    Attributes:
        features (Tensor[R, D]): fc7 features of the image's windows (ground truths among them).
        window_ious (Tensor[R, K]): each window's highest IoU with a ground truth of each class
            (0 where the image has none of that class).
        is_gt (BoolTensor[R]): which windows are ground-truth boxes.
        gt_labels (LongTensor[G]): 0-based classes of the ``is_gt`` windows, in window order.
        boxes (Tensor[R, 4] or None): windows, xyxy in image pixels; needed by the 0.7 dedup.
    """

    features: Tensor
    window_ious: Tensor
    is_gt: Tensor
    gt_labels: Tensor
    boxes: Optional[Tensor] = None


class HardNegativeMiner:
    """R-CNN's one-pass hard negative mining over a stream of images.

    Use: optionally ``add_positives`` (every ground truth's features, R-CNN's order), then
    ``add_image`` per image, then ``finish()``. Without ``add_positives`` each image's ground
    truths join the positives as the image is added.

    Args:
        svms: the models being trained (their solver settings and feature scale are used).
        neg_iou_thresh: negatives of class c have IoU < 0.3 with every ground truth of c
            (R-CNN ``neg_ovr_thresh``; strict, as in ``rcnn_train.m``).
        dedup_negatives: drop a negative that overlaps a kept negative of the same image by more
            than ``neg_overlap`` (SPP-net sec. 4.1: 0.7; the released code skips it). Greedy
            over the current scores, so the hardest of a cluster stays (ties: window order).
        hard_thresh: a negative scoring above this joins the cache (R-CNN: -1.0001).
        easy_thresh: after a retrain, cached negatives scoring below this leave (R-CNN: -1.2).
        retrain_every: retrain every this many images (DESIGN.md: 2,000; see
            ``scaled_retrain_every`` for small datasets), besides the first model of each class
            and the final retrain in ``finish``.
        retrain_limit: also retrain class c once more than this many negatives joined its
            cache since its last retrain (R-CNN's actual rule, ``retrain_limit = 2000``); None
            disables it.
        cache_device: where cached features live.
    """

    def __init__(
        self,
        svms: LinearSVMs,
        neg_iou_thresh: float = 0.3,
        dedup_negatives: bool = True,
        neg_overlap: float = 0.7,
        hard_thresh: float = -1.0001,
        easy_thresh: float = -1.2,
        retrain_every: int = 2000,
        retrain_limit: Optional[int] = None,
        cache_device: Union[str, torch.device] = "cpu",
    ) -> None:
        if easy_thresh > hard_thresh:
            raise ValueError(
                f"easy_thresh ({easy_thresh}) must not exceed hard_thresh ({hard_thresh})"
            )
        self.svms = svms
        self.neg_iou_thresh = float(neg_iou_thresh)
        self.dedup_negatives = bool(dedup_negatives)
        self.neg_overlap = float(neg_overlap)
        self.hard_thresh = float(hard_thresh)
        self.easy_thresh = float(easy_thresh)
        self.retrain_every = max(1, int(retrain_every))
        self.retrain_limit = retrain_limit
        self.cache_device = torch.device(cache_device)
        k = svms.num_classes
        self.num_images = 0
        self._pos: List[List[Tensor]] = [[] for _ in range(k)]
        self._neg: List[List[Tensor]] = [[] for _ in range(k)]
        self._keys: List[List[Tensor]] = [[] for _ in range(k)]
        self._num_added = [0] * k
        self._dirty = [False] * k
        self._positives_preloaded = False
        self.history: List[Dict[str, Any]] = []

    # -- inspection -------------------------------------------------------------------------
    def num_positives(self, c: int) -> int:
        return sum(int(t.shape[0]) for t in self._pos[c])

    def cache_size(self, c: int) -> int:
        return sum(int(t.shape[0]) for t in self._neg[c])

    def cached_keys(self, c: int) -> Tensor:
        """LongTensor[M, 2]: ``(image index, window index)`` of class c's cached negatives."""
        self._compact(c)
        return self._keys[c][0] if self._keys[c] else torch.zeros(0, 2, dtype=torch.long)

    def _compact(self, c: int) -> None:
        for store in (self._neg, self._keys, self._pos):
            if len(store[c]) > 1:
                store[c] = [torch.cat(store[c])]

    # -- input ------------------------------------------------------------------------------
    def add_positives(self, features: Tensor, labels: Tensor) -> None:
        """Every ground truth's features up front (R-CNN's order), before any ``add_image``.

        Args:
            features (Tensor[P, D]): fc7 features of ground-truth boxes.
            labels (LongTensor[P]): their 0-based classes.
        """
        if self.num_images and not self._positives_preloaded:
            raise ValueError("add_positives must come before the first add_image")
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(
                f"add_positives: need features[P, D] and labels[P], got "
                f"{tuple(features.shape)} and {tuple(labels.shape)}"
            )
        self._positives_preloaded = True
        self._add_positives(features, labels)

    def _add_positives(self, features: Tensor, labels: Tensor) -> None:
        k = self.svms.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"positive labels must lie in [0, {k})")
        feats = features.detach().to(self.cache_device, torch.float32)
        labels = labels.to(self.cache_device)
        for c in torch.unique(labels).tolist():
            self._pos[c].append(feats[labels == c])
            self._dirty[c] = True

    @torch.no_grad()
    def add_image(
        self,
        features: Tensor,
        window_ious: Tensor,
        is_gt: Tensor,
        gt_labels: Tensor,
        boxes: Optional[Tensor] = None,
    ) -> List[int]:
        """Mine one image's negatives (see ``MiningImage`` for the arguments).

        Returns:
            The number of negatives that joined each class's cache.
        """
        k = self.svms.num_classes
        r = features.shape[0]
        if features.ndim != 2:
            raise ValueError(f"features must be Tensor[R, D], got {tuple(features.shape)}")
        if window_ious.shape != (r, k):
            raise ValueError(
                f"window_ious must be Tensor[{r}, {k}], got {tuple(window_ious.shape)}"
            )
        if is_gt.shape != (r,) or is_gt.dtype != torch.bool:
            raise ValueError(
                f"is_gt must be BoolTensor[{r}], got {is_gt.dtype} {tuple(is_gt.shape)}"
            )
        if gt_labels.shape != (int(is_gt.sum()),):
            raise ValueError(
                f"gt_labels must have one label per is_gt window "
                f"({int(is_gt.sum())}), got {tuple(gt_labels.shape)}"
            )
        if self.dedup_negatives and boxes is None:
            raise ValueError("add_image: boxes are needed for dedup_negatives (or set it False)")
        if boxes is not None and boxes.shape != (r, 4):
            raise ValueError(f"boxes must be Tensor[{r}, 4], got {tuple(boxes.shape)}")
        image_idx = self.num_images
        self.num_images += 1
        added = [0] * k
        if r:
            if self.svms.feature_dim != features.shape[1]:
                if bool(self.svms.trained.any()):
                    raise ValueError(
                        f"features have D={features.shape[1]}, SVMs have {self.svms.feature_dim}"
                    )
                self.svms.reset_weights(features.shape[1])
            if not self.svms.has_feature_scale:
                # Fallback: the first image's windows (pass a wider sample to set_feature_scale
                # beforehand to follow R-CNN's 200 x 200 random windows).
                scale = self.svms.set_feature_scale(features)
                logger.info("SVM feature scale %.4g from the first image's %d windows", scale, r)
            if not self._positives_preloaded and bool(is_gt.any()):
                self._add_positives(features[is_gt], gt_labels)
            added = self._mine(image_idx, features, window_ious, boxes)
        self._maybe_retrain(is_first_image=image_idx == 0)
        return added

    def _mine(
        self, image_idx: int, features: Tensor, window_ious: Tensor, boxes: Optional[Tensor]
    ) -> List[int]:
        k = self.svms.num_classes
        scores = self.svms.scores(features)  # [R, K]; all 0 for a class not yet trained
        ious = window_ious.to(scores.device)
        cand = (ious < self.neg_iou_thresh) & (scores > self.hard_thresh)
        rows, cls = torch.nonzero(cand, as_tuple=True)
        if self.dedup_negatives and rows.numel():
            rows, cls = self._dedup(rows, cls, scores[rows, cls], boxes.to(scores.device))
        added = [0] * k
        feats = features.detach()
        for c in torch.unique(cls).tolist():
            idx = rows[cls == c]
            self._neg[c].append(feats[idx].to(self.cache_device, torch.float32))
            keys = torch.stack([torch.full_like(idx, image_idx), idx], dim=1)
            self._keys[c].append(keys.to(self.cache_device))
            added[c] = int(idx.numel())
            self._num_added[c] += added[c]
            self._dirty[c] = True
        return added

    def _dedup(
        self, rows: Tensor, cls: Tensor, scores: Tensor, boxes: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Greedy per-class suppression of negatives overlapping a harder one by > neg_overlap."""
        # Order by decreasing score, ties by window index (rows come sorted), then hand NMS a
        # strictly decreasing surrogate score so the order is exactly this one.
        order = torch.argsort(-scores, stable=True)
        rows, cls = rows[order], cls[order]
        surrogate = -torch.arange(rows.numel(), dtype=torch.float32, device=rows.device)
        keep = batched_nms(boxes[rows].float(), surrogate, cls, self.neg_overlap)
        keep = torch.sort(keep).values
        return rows[keep], cls[keep]

    # -- training ---------------------------------------------------------------------------
    def _maybe_retrain(self, is_first_image: bool) -> None:
        periodic = self.num_images % self.retrain_every == 0
        for c in range(self.svms.num_classes):
            if not self._trainable(c):
                continue
            first_model = not bool(self.svms.trained[c])  # R-CNN: the first image's model
            over_limit = self.retrain_limit is not None and self._num_added[c] > self.retrain_limit
            if first_model or over_limit or (periodic and self._dirty[c]):
                self.retrain(c)

    def _trainable(self, c: int) -> bool:
        return self.num_positives(c) > 0 and self.cache_size(c) > 0

    def retrain(self, c: int) -> Dict[str, Any]:
        """Retrain class c on positives + cached negatives, then evict the easy negatives."""
        self._compact(c)
        pos, neg = self._pos[c][0], self._neg[c][0]
        stats = self.svms.fit_class(c, pos, neg)
        w = self.svms.weight[c].to(self.cache_device)
        z_neg = self.svms.scale_features(neg) @ w + self.svms.bias[c].to(self.cache_device)
        keep = z_neg >= self.easy_thresh
        self._neg[c] = [neg[keep]]
        self._keys[c] = [self._keys[c][0][keep]]
        self._num_added[c] = 0
        self._dirty[c] = False
        stats.update(
            cls=c,
            image=self.num_images,
            num_pos=int(pos.shape[0]),
            num_neg=int(neg.shape[0]),
            evicted=int((~keep).sum()),
            cache=int(keep.sum()),
        )
        self.history.append(stats)
        logger.info(
            "SVM class %d after %d images: %d pos, %d neg, objective %.4f (pos %.4f neg %.4f "
            "reg %.4f), %d easy negatives evicted",
            c,
            self.num_images,
            stats["num_pos"],
            stats["num_neg"],
            stats["total"],
            stats["pos_loss"],
            stats["neg_loss"],
            stats["reg_loss"],
            stats["evicted"],
        )
        return stats

    def finish(self) -> LinearSVMs:
        """Final retrain of every class (R-CNN: at the last image); returns the SVMs."""
        for c in range(self.svms.num_classes):
            if self._trainable(c):
                self.retrain(c)
            else:
                logger.warning(
                    "SVM class %d: %d positives, %d negatives: not trained, never detected",
                    c,
                    self.num_positives(c),
                    self.cache_size(c),
                )
                self.svms.mark_untrained(c)
        return self.svms


ImageItem = Union[MiningImage, Sequence[Any], Dict[str, Any]]


def train_svms(
    images: Iterable[ImageItem],
    num_classes: int,
    positives: Optional[Tuple[Tensor, Tensor]] = None,
    feature_scale: Optional[Union[float, Tensor]] = None,
    num_images: Optional[int] = None,
    *,
    C: float = 0.001,
    pos_weight: float = 2.0,
    bias_multiplier: float = 10.0,
    feature_norm: float = 20.0,
    loss: str = "hinge",
    neg_iou_thresh: float = 0.3,
    dedup_negatives: bool = True,
    neg_overlap: float = 0.7,
    hard_thresh: float = -1.0001,
    easy_thresh: float = -1.2,
    retrain_every: int = 2000,
    retrain_limit: Optional[int] = None,
) -> LinearSVMs:
    """Train K SVMs with one pass of hard negative mining.

    Args:
        images: per image a ``MiningImage``, a tuple in its field order, or a dict of its fields.
        num_classes: K.
        positives: ``(features Tensor[P, D], labels LongTensor[P])`` of every ground truth, given
            up front as R-CNN does; None takes them from the images as they come.
        feature_scale: a float or a sample ``Tensor[N, D]`` of training features; None uses the
            first image's windows.
        num_images: when given, ``retrain_every`` is scaled to a dataset of this many images
            (``scaled_retrain_every``); None uses ``retrain_every`` as it is.
        Other keywords: see ``LinearSVMs`` and ``HardNegativeMiner`` (paper defaults).
    Returns:
        The trained ``LinearSVMs``.
    """
    svms = LinearSVMs(
        num_classes,
        C=C,
        pos_weight=pos_weight,
        bias_multiplier=bias_multiplier,
        feature_norm=feature_norm,
        loss=loss,
    )
    if feature_scale is not None:
        svms.set_feature_scale(feature_scale)
    miner = HardNegativeMiner(
        svms,
        neg_iou_thresh=neg_iou_thresh,
        dedup_negatives=dedup_negatives,
        neg_overlap=neg_overlap,
        hard_thresh=hard_thresh,
        easy_thresh=easy_thresh,
        retrain_every=scaled_retrain_every(retrain_every, num_images),
        retrain_limit=retrain_limit,
    )
    if positives is not None:
        miner.add_positives(*positives)
    for item in images:
        if isinstance(item, dict):
            miner.add_image(**item)
        else:
            miner.add_image(*item)
    return miner.finish()
