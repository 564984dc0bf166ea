"""R-CNN's one-pass hard negative mining of the per-class SVMs' negatives.

SPP-net sec. 4.1 follows R-CNN: positives are the ground-truth boxes, negatives are windows that
overlap every positive of the class by less than 0.3, a negative overlapping another negative by
more than 0.7 is removed (SPP-net), and hard negatives are mined in one pass over the training
images. As in R-CNN's ``rcnn_train.m`` (and SPP_net's ``spp_train.m``), a negative joins the
cache when it scores above -1.0001 and leaves it when it scores below -1.2 after a retrain, and a
class is retrained once more than 2,000 new negatives joined its cache since its last training
(``retrain_limit``), and at the end. Each retrain is one ``SVMSolver.fit`` (``svm_solver.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torchvision.ops import nms

from ..modeling.svm import LinearSVMs
from .svm_solver import SVMSolver

__all__ = ["HardNegativeMiner", "MiningImage"]

logger = logging.getLogger(__name__)


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

    When a class is trained (``rcnn_train.m``, ``spp_train.m``):
    - its first model, after the first image that gives it positives and negatives (R-CNN:
      ``first_time``, the first image, since all positives are loaded up front);
    - after an image that brings the negatives added to its cache since its last training to
      more than ``retrain_limit`` (``hit_retrain_limit = num_added > retrain_limit``);
    - once at the end (``finish``; R-CNN: ``is_last_time``), unless it was just trained after
      the last image.

    Args:
        svms: the models being trained (their feature scale is used).
        solver: liblinear's settings (R-CNN's by default).
        neg_iou_thresh: negatives of class c have IoU < 0.3 with every ground truth of c
            (R-CNN ``neg_ovr_thresh``; strict, as in ``rcnn_train.m``).
        dedup_negatives: drop a negative that overlaps a kept negative of the same image by more
            than ``neg_overlap`` (SPP-net sec. 4.1: 0.7; the released code skips it). Greedy
            over the current scores, so the hardest of a cluster stays (ties: window order).
        hard_thresh: a negative scoring above this joins the cache (R-CNN: -1.0001).
        easy_thresh: after a retrain, cached negatives scoring below this leave (R-CNN: -1.2).
        retrain_limit: retrain class c once more than this many negatives joined its cache
            since its last training (R-CNN / SPP_net ``cache.retrain_limit = 2000``).
        max_cached_negatives: at most this many negatives in a class's cache (ours; 0: no
            cap). When an image's negatives take a cache past it, the hardest are kept: the
            highest scores under the class's current model, ties (a class not trained yet
            scores 0 everywhere) to the first mined. Such negatives are the support vectors
            the next retrain needs; the easiest would leave at that retrain anyway. Below the
            cap nothing changes.
        cache_device: where cached features live.
        classes: train only these classes (None: all K). The others are skipped entirely (no
            mining, no cache, no retrain; their rows of ``svms`` stay as they are), and each
            class trained gets exactly the model the full miner gives it: every step of a
            class depends on its own data only (the K-column scores are computed whole, so
            even their rounding is the full miner's). ``torchrun`` divides the classes so.
    """

    def __init__(
        self,
        svms: LinearSVMs,
        solver: Optional[SVMSolver] = None,
        neg_iou_thresh: float = 0.3,
        dedup_negatives: bool = True,
        neg_overlap: float = 0.7,
        hard_thresh: float = -1.0001,
        easy_thresh: float = -1.2,
        retrain_limit: int = 2000,
        max_cached_negatives: int = 0,
        cache_device: Union[str, torch.device] = "cpu",
        classes: Optional[Sequence[int]] = None,
    ) -> None:
        if easy_thresh > hard_thresh:
            raise ValueError(
                f"easy_thresh ({easy_thresh}) must not exceed hard_thresh ({hard_thresh})"
            )
        if int(retrain_limit) < 0:
            raise ValueError(f"retrain_limit must be >= 0, got {retrain_limit}")
        if int(max_cached_negatives) < 0:
            raise ValueError(f"max_cached_negatives must be >= 0, got {max_cached_negatives}")
        self.max_cached_negatives = int(max_cached_negatives)
        self.svms = svms
        self.solver = solver if solver is not None else SVMSolver()
        self.neg_iou_thresh = float(neg_iou_thresh)
        self.dedup_negatives = bool(dedup_negatives)
        self.neg_overlap = float(neg_overlap)
        self.hard_thresh = float(hard_thresh)
        self.easy_thresh = float(easy_thresh)
        self.retrain_limit = int(retrain_limit)
        self.cache_device = torch.device(cache_device)
        k = svms.num_classes
        self.classes = list(range(k)) if classes is None else sorted({int(c) for c in classes})
        if any(not 0 <= c < k for c in self.classes):
            raise ValueError(f"classes must lie in [0, {k}), got {self.classes}")
        self._own = torch.zeros(k, dtype=torch.bool)
        self._own[torch.tensor(self.classes, dtype=torch.long)] = True
        self.num_images = 0
        self._pos: List[List[Tensor]] = [[] for _ in range(k)]
        self._neg: List[List[Tensor]] = [[] for _ in range(k)]
        self._keys: List[List[Tensor]] = [[] for _ in range(k)]
        # Negatives that joined each cache since the class was last trained (R-CNN num_added).
        self._num_added = [0] * k
        # num_images when each class was last trained (-1: never).
        self._trained_at = [-1] * k
        self._positives_preloaded = False
        self.history: List[Dict[str, Any]] = []

    # -- inspection -------------------------------------------------------------------------
    def num_positives(self, c: int) -> int:
        return sum(int(t.shape[0]) for t in self._pos[c])

    def cache_size(self, c: int) -> int:
        return sum(int(t.shape[0]) for t in self._neg[c])

    def num_added(self, c: int) -> int:
        """Negatives that joined class c's cache since its last training."""
        return self._num_added[c]

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
            if self._own[c]:
                self._pos[c].append(feats[labels == c])

    def _check_image(self, features, window_ious, is_gt, gt_labels, boxes) -> None:
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

    @torch.no_grad()
    def add_image(
        self,
        features: Tensor,
        window_ious: Tensor,
        is_gt: Tensor,
        gt_labels: Tensor,
        boxes: Optional[Tensor] = None,
    ) -> List[int]:
        """Mine one image's negatives (see ``MiningImage`` for the arguments), then retrain
        the classes whose turn it is.

        Returns:
            The number of negatives that joined each class's cache.
        """
        self._check_image(features, window_ious, is_gt, gt_labels, boxes)
        r = features.shape[0]
        image_idx = self.num_images
        self.num_images += 1
        added = [0] * self.svms.num_classes
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
        for c in self.classes:
            if not self._trainable(c):
                continue
            first_model = self._trained_at[c] < 0
            if first_model or self._num_added[c] > self.retrain_limit:
                self.retrain(c)
        return added

    def _mine(
        self, image_idx: int, features: Tensor, window_ious: Tensor, boxes: Optional[Tensor]
    ) -> List[int]:
        k = self.svms.num_classes
        scores = self.svms.scores(features)  # [R, K]; all 0 for a class not yet trained
        ious = window_ious.to(scores.device)
        cand = (ious < self.neg_iou_thresh) & (scores > self.hard_thresh)
        cand &= self._own.to(cand.device)
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
            if 0 < self.max_cached_negatives < self.cache_size(c):
                self._keep_hardest(c)
        return added

    def _keep_hardest(self, c: int) -> None:
        """Cut class c's cache to ``max_cached_negatives``: the highest-scoring negatives under
        its current model, in cache order (ties: the first mined)."""
        self._compact(c)
        neg, keys = self._neg[c][0], self._keys[c][0]
        w = self.svms.weight[c].to(self.cache_device)
        z = self.svms.scale_features(neg) @ w + self.svms.bias[c].to(self.cache_device)
        order = torch.argsort(-z, stable=True)[: self.max_cached_negatives]
        keep = torch.sort(order).values
        logger.debug("SVM class %d: cache capped at %d of %d", c, keep.numel(), neg.shape[0])
        self._neg[c] = [neg[keep]]
        self._keys[c] = [keys[keep]]

    def _dedup(
        self, rows: Tensor, cls: Tensor, scores: Tensor, boxes: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Greedy per-class suppression of negatives overlapping a harder one by > neg_overlap."""
        # Order by decreasing score, ties by window index (rows come sorted), then hand NMS a
        # strictly decreasing surrogate score so the order is exactly this one. One NMS per
        # class on the boxes as they are (batched_nms's coordinate offsets would round each
        # class's boxes by an amount that depends on the other classes).
        order = torch.argsort(-scores, stable=True)
        rows, cls = rows[order], cls[order]
        surrogate = -torch.arange(rows.numel(), dtype=torch.float32, device=rows.device)
        kept = []
        for c in torch.unique(cls).tolist():
            idx = torch.nonzero(cls == c).flatten()
            kept.append(idx[nms(boxes[rows[idx]].float(), surrogate[idx], self.neg_overlap)])
        keep = torch.sort(torch.cat(kept)).values
        return rows[keep], cls[keep]

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue the pass (plain types and tensors, for ``save_file``):
        the SVMs, every class's positives, cached negatives and their keys, the retrain
        counters and the history."""
        k = self.svms.num_classes
        for c in range(k):
            self._compact(c)

        def first(store: List[List[Tensor]], c: int) -> Optional[Tensor]:
            return store[c][0] if store[c] else None

        return {
            "svms": {n: t.detach().cpu() for n, t in self.svms.state_dict().items()},
            "pos": [first(self._pos, c) for c in range(k)],
            "neg": [first(self._neg, c) for c in range(k)],
            "keys": [first(self._keys, c) for c in range(k)],
            "num_added": list(self._num_added),
            "trained_at": list(self._trained_at),
            "num_images": self.num_images,
            "positives_preloaded": self._positives_preloaded,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state_dict()`` (same number of classes)."""
        k = self.svms.num_classes
        if len(state["pos"]) != k:
            raise ValueError(f"miner state has {len(state['pos'])} classes, expected {k}")
        self.svms.load_state_dict(state["svms"])
        dev = self.cache_device
        for store, name in ((self._pos, "pos"), (self._neg, "neg"), (self._keys, "keys")):
            for c in range(k):
                t = state[name][c]
                store[c] = [] if t is None else [t.to(dev)]
        self._num_added = [int(v) for v in state["num_added"]]
        self._trained_at = [int(v) for v in state["trained_at"]]
        self.num_images = int(state["num_images"])
        self._positives_preloaded = bool(state["positives_preloaded"])
        self.history = [dict(h) for h in state["history"]]

    # -- training ---------------------------------------------------------------------------
    def _trainable(self, c: int) -> bool:
        return self.num_positives(c) > 0 and self.cache_size(c) > 0

    def retrain(self, c: int) -> Dict[str, Any]:
        """Retrain class c on positives + cached negatives, then evict the easy negatives."""
        self._compact(c)
        pos, neg = self._pos[c][0], self._neg[c][0]
        stats = self.solver.fit(self.svms, c, pos, neg)
        w = self.svms.weight[c].to(self.cache_device)
        z_neg = self.svms.scale_features(neg) @ w + self.svms.bias[c].to(self.cache_device)
        keep = z_neg >= self.easy_thresh
        self._neg[c] = [neg[keep]]
        self._keys[c] = [self._keys[c][0][keep]]
        self._num_added[c] = 0
        self._trained_at[c] = self.num_images
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
            *(c, self.num_images, stats["num_pos"], stats["num_neg"], stats["total"]),
            *(stats["pos_loss"], stats["neg_loss"], stats["reg_loss"], stats["evicted"]),
        )
        return stats

    def finish(self) -> LinearSVMs:
        """The final training of every class (R-CNN: at the last image), except a class already
        trained after the last image; returns the SVMs."""
        for c in self.classes:
            if not self._trainable(c):
                logger.warning(
                    "SVM class %d: %d positives, %d negatives: not trained, never detected",
                    *(c, self.num_positives(c), self.cache_size(c)),
                )
                self.svms.mark_untrained(c)
            elif self._trained_at[c] != self.num_images:
                self.retrain(c)
        return self.svms
