"""Gathering the box regressors' training windows image by image, under memory caps, then
fitting them (``bbox_fit.fit_box_regressor``: R-CNN's per-class ridge regression)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..config import BBoxRegConfig
from ..modeling.box_regression import BoxRegressor
from .bbox_fit import FIT_CHUNK_ROWS, check_boxes, fit_box_regressor_by_class, scale_from_norms
from .sample_store import RowStore

__all__ = ["BoxRegressionTrainer"]

logger = logging.getLogger(__name__)


class BoxRegressionTrainer:
    """Gathers the regression windows image by image, then fits the regressors.

    Memory is bounded twice (ours; the papers keep every window): at most ``max_per_image``
    windows per image, drawn at random, and at most ``max_samples`` per class over the whole
    set, a uniform sample of every window the class was offered (reservoir sampling, Vitter's
    algorithm R: the t-th window replaces a random kept one with probability cap / t). Below
    both caps every window is kept, per class in image order, and the fit is the uncapped one.
    The per-image draw has one generator (seeded by ``seed``) and sees every class; each
    class's reservoir has its own (seeded by ``(seed, class)``), so a class's samples and fit
    never depend on which other classes a process handles (``classes``, as torchrun divides
    them).

    Args:
        iou_thresh: a window is a sample when its highest IoU with a ground truth is above this
            (``BBoxRegConfig.iou_thresh``).
        lambda_: ridge weight (``BBoxRegConfig.lambda_``).
        max_per_image: at most this many samples per image (0: no cap).
        max_samples: at most this many samples per class (0: no cap).
        seed: seed of the draws.
        store_dtype: the samples' features are kept on the CPU in this dtype (float16 halves
            the memory of thousands of 12,800-D windows).
        classes: gather and fit only these classes (None: all); the others are skipped.
        spill_dir: keep the samples' features in files there (``sample_store.RowStore``), so
            that neither gathering nor the fit holds them all in memory; None: in memory.
    """

    def __init__(
        self,
        iou_thresh: float = 0.5,
        lambda_: float = 4000.0,
        max_per_image: int = 256,
        max_samples: int = 0,
        seed: int = 0,
        store_dtype: torch.dtype = torch.float16,
        classes: Optional[Sequence[int]] = None,
        spill_dir: Optional[Union[str, Path]] = None,
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
        self.seed = int(seed)
        self.classes = None if classes is None else sorted({int(c) for c in classes})
        self._generator = torch.Generator().manual_seed(self.seed)  # the per-image cap
        self._class_generators: Dict[int, torch.Generator] = {}  # the reservoirs
        # Per class: the features (a RowStore, made with the first rows), chunks of windows
        # and matched ground truths in arrival order, and how many windows the class was
        # offered (the reservoir's t).
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self._features: Optional[RowStore] = None
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
        return sum(self.class_samples(c) for c in self._boxes)

    def class_samples(self, c: int) -> int:
        """Samples kept for class ``c``."""
        return sum(int(t.shape[0]) for t in self._boxes.get(c, []))

    def class_features(self, c: int) -> Tensor:
        """Tensor[n, D]: the features kept for class ``c`` (in ``store_dtype``, on the CPU)."""
        return self._features.read(c) if self._features is not None else torch.zeros(0, 0)

    def remove_spilled(self) -> None:
        """Delete the spilled samples (once the fit and every checkpoint naming them are
        done)."""
        if self._features is not None:
            self._features.remove()

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
            subsampled; of ``classes`` only); the per-class cap may drop some of them later.
        """
        check_boxes(windows, "windows")
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
        labels = gt_labels.cpu()[match[sel]]
        if self.classes is not None:
            mine = torch.isin(labels, torch.tensor(self.classes, dtype=labels.dtype))
            sel, labels = sel[mine], labels[mine]
        feats = features[sel.to(features.device)].to("cpu", self.store_dtype)
        if self._features is None:
            self._features = RowStore(feats.shape[1], self.store_dtype, self.spill_dir)
        for c in torch.unique(labels).tolist():  # ascending: a fixed order of the draws
            rows = torch.nonzero(labels == c).flatten()
            self._offer(c, feats[rows], windows[sel[rows]], gt_boxes[match[sel[rows]]])
        return sel

    def _offer(self, c: int, feats: Tensor, boxes: Tensor, gt: Tensor) -> None:
        """Keep what fits below the cap; the rest goes through the reservoir."""
        for store in (self._boxes, self._gt):
            store.setdefault(c, [])
        seen = self._seen.get(c, 0)
        self._seen[c] = seen + feats.shape[0]
        room = feats.shape[0] if self.max_samples == 0 else self.max_samples - seen
        room = max(0, min(room, feats.shape[0]))
        if room:
            self._features.append(c, feats[:room])
            self._boxes[c].append(boxes[:room])
            self._gt[c].append(gt[:room])
        extra = feats.shape[0] - room
        if extra == 0:
            return
        # Algorithm R: window number t (1-based, over the class) replaces slot j, j uniform in
        # [0, t), when j < cap. Later windows overwrite earlier ones, as in the sequential rule.
        for store in (self._boxes, self._gt):
            store[c] = [torch.cat(store[c])]
        t = torch.arange(seen + room + 1, seen + feats.shape[0] + 1, dtype=torch.float64)
        u = torch.rand(extra, generator=self._class_generator(c), dtype=torch.float64)
        slots = (u * t).floor().long().tolist()
        last = {}
        for i, j in enumerate(slots):
            if j < self.max_samples:
                last[j] = room + i
        if last:
            slot = torch.tensor(list(last.keys()))
            src = torch.tensor(list(last.values()))
            self._features.assign(c, slot, feats[src])
            self._boxes[c][0][slot] = boxes[src]
            self._gt[c][0][slot] = gt[src]

    def _class_generator(self, c: int) -> torch.Generator:
        if c not in self._class_generators:
            seed = np.random.SeedSequence([self.seed, c]).generate_state(1, np.uint64)[0]
            self._class_generators[c] = torch.Generator().manual_seed(int(seed >> np.uint64(1)))
        return self._class_generators[c]

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue (plain types and tensors, for ``save_file``). The
        features of a spilling trainer are a snapshot on disk that the state names
        (``RowStore.state_dict``): save the state before the next call."""
        classes = sorted(self._boxes)
        for store in (self._boxes, self._gt):
            for c in classes:
                if len(store[c]) > 1:
                    store[c] = [torch.cat(store[c])]
        return {
            "classes": classes,
            "features": None if self._features is None else self._features.state_dict(),
            "boxes": [self._boxes[c][0] if self._boxes[c] else None for c in classes],
            "gt": [self._gt[c][0] if self._gt[c] else None for c in classes],
            "seen": [self._seen[c] for c in classes],
            "generator": self._generator.get_state(),
            "class_generators": {c: g.get_state() for c, g in self._class_generators.items()},
        }

    def can_load(self, state: Dict[str, Any]) -> bool:
        """Whether ``state`` can be continued here (a spilled state needs its snapshot files
        and this trainer's ``spill_dir``)."""
        features = state.get("features")
        if not isinstance(features, dict):
            return features is None
        return self._store(int(features["dim"])).can_load(features)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state_dict()``."""
        self._boxes, self._gt, self._seen = {}, {}, {}
        self._features = None
        if state["features"] is not None:
            self._features = self._store(int(state["features"]["dim"]))
            self._features.load_state_dict(state["features"])
        for i, c in enumerate(state["classes"]):
            for store, name in ((self._boxes, "boxes"), (self._gt, "gt")):
                t = state[name][i]
                store[c] = [] if t is None else [t]
            self._seen[c] = int(state["seen"][i])
        self._generator.set_state(state["generator"])
        self._class_generators = {}
        for c, g_state in state["class_generators"].items():
            self._class_generator(int(c)).set_state(g_state)

    def _store(self, dim: int) -> RowStore:
        return RowStore(dim, self.store_dtype, self.spill_dir)

    def fit(
        self, num_classes: int, feature_scale: Optional[float] = None, **kwargs
    ) -> Optional[BoxRegressor]:
        """The regressors fitted on every sample kept (``fit_box_regressor``; keywords go to
        it), or None when there is no sample (a detector without regressor keeps its windows).
        With ``classes``, only those are fitted; the others keep the identity (untrained), as a
        class without samples does in the full fit.
        """
        if self.num_samples == 0:
            logger.warning("box regression: no training windows; no regressor trained")
            return None
        classes = [c for c in sorted(self._boxes) if self.class_samples(c)]
        for c in classes:
            if self.offered(c) > self.class_samples(c):
                logger.info(
                    "box regression: class %d keeps a uniform sample of %d of its %d windows",
                    *(c, self.class_samples(c), self.offered(c)),
                )
        fitted = list(range(num_classes)) if self.classes is None else self.classes
        index = {c: i for i, c in enumerate(fitted)}  # class -> row of the fit
        feature_norm = float(kwargs.pop("feature_norm", 20.0))
        store = self._features
        if feature_scale is None:  # R-CNN: mean norm of all rows, taken chunk by chunk
            norms = [
                t.double().norm(dim=1) for c in classes for t in store.chunks(c, FIT_CHUNK_ROWS)
            ]
            feature_scale = scale_from_norms(torch.cat(norms), feature_norm)

        def one(parts: List[Tensor]) -> Tensor:
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        # One class at a time; the fit reads its features back chunk by chunk, in their
        # storage dtype, so only the ridge system is ever whole.
        rows = (
            (index[c], partial(store.chunks, c), one(self._boxes[c]), one(self._gt[c]))
            for c in classes
        )
        part = fit_box_regressor_by_class(
            rows, len(fitted), store.dim, feature_scale,
            lambda_=self.lambda_, iou_thresh=self.iou_thresh, **kwargs,
        )  # fmt: skip
        return part if self.classes is None else _expand(part, fitted, num_classes)


def _expand(part: BoxRegressor, classes: Sequence[int], num_classes: int) -> BoxRegressor:
    """A K-class regressor whose rows ``classes`` are ``part``'s (in order) and whose other
    rows are untrained (zero weights, identity target transform)."""
    full = BoxRegressor(num_classes, tuple(part.delta_weights.tolist())).to(part.weight.device)
    state = full.state_dict()
    state["weight"] = part.weight.new_zeros(num_classes, *part.weight.shape[1:])
    state["feature_scale"] = part.feature_scale.clone()
    idx = torch.tensor(list(classes), dtype=torch.long, device=part.weight.device)
    for name in ("weight", "target_mean", "target_transform", "trained"):
        state[name][idx] = getattr(part, name)
    full.load_state_dict(state)
    return full
