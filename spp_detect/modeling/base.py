"""``WindowDetector``: what SPP-net (``spp_net.SPPDetector``) and the R-CNN baseline
(``rcnn.RCNNDetector``) share: the fc6/fc7 head, per-class linear SVMs (or the fine-tuned softmax),
box regression, per-class NMS and saving. The two differ only in how a window becomes a pooled
feature vector (``compute_pooled``).

A detector holds its test settings (``config.test``, ``config.model.scales``) and never changes
them, its mode or its layers as a side effect of detecting: ``with_settings`` returns a new,
configured detector that shares the weights, as torchvision's detectors take their test
settings as constructor arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from ..config import DetectorConfig, TestConfig, fc_width
from ..serialization import save_file
from ..structures import Detections
from ..utils import StageTimer, null_timer
from .box_regression import BoxRegressor
from .fast_conv import fast_backbone
from .fast_head import build_fast_head
from .lowrank import check_head_stats
from .head import FCHead
from .svm import LinearSVMs

__all__ = ["WindowDetector", "MODEL_FORMAT", "rank_within_group"]

logger = logging.getLogger(__name__)

MODEL_FORMAT = "spp_detect-model/1"

ImageLike = Union[np.ndarray, Tensor]


def rank_within_group(groups: Tensor) -> Tensor:
    """LongTensor[N]: position of each element among the earlier elements of its group
    (0 for the first of each group), e.g. ``[1, 0, 1, 1] -> [0, 0, 1, 2]``."""
    if groups.numel() == 0:
        return groups.new_zeros(0)
    order = torch.sort(groups, stable=True).indices
    sorted_groups = groups[order]
    idx = torch.arange(groups.numel(), device=groups.device)
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    ranks = torch.empty_like(idx)
    ranks[order] = idx - first
    return ranks


class WindowDetector(nn.Module):
    """Shared detection machinery over pooled window features.

    Args:
        backbone: a module from ``build_backbone`` (conv layers; frozen here).
        class_names: the K object classes, in label order.
        config: the detector configuration (paper defaults).
    """

    method = "base"

    def __init__(self, backbone: nn.Module, class_names: Sequence[str], config: DetectorConfig):
        super().__init__()
        if len(class_names) == 0:
            raise ValueError("a detector needs at least one class")
        self.backbone = backbone
        self.class_names = list(class_names)
        self.config = config
        for p in self.backbone.parameters():
            # SPP-net fine-tunes only the fc layers (sec. 4.1); the conv layers stay frozen.
            p.requires_grad_(False)
        self.head = FCHead(
            self.pooled_dim,
            len(self.class_names),
            hidden=fc_width(config.model),
            dropout=config.model.dropout,
            init_std=config.finetune.init_std,
        )
        self.svms: Optional[LinearSVMs] = None
        self.bbox_regressor: Optional[BoxRegressor] = None
        # Mean and principal directions of fc6's and fc7's responses on training windows
        # (``training/head_stats.py``), for ``test.svd_method="responses"`` (``lowrank.py``).
        self.head_stats: Optional[Dict[str, Any]] = None

    # -- what subclasses provide -------------------------------------------------------------
    @property
    def pooled_dim(self) -> int:
        raise NotImplementedError

    def compute_pooled(
        self, image: Tensor, windows: Tensor, timer: StageTimer
    ) -> Tuple[Tensor, Tensor]:
        """Pooled features of the distinct windows.

        Args:
            image (Tensor[3, H, W]): the preprocessed image on the model's device.
            windows (Tensor[R, 4]): xyxy in pixels of the original image.
        Returns:
            pooled (Tensor[U, pooled_dim]) for U distinct windows, and inverse (LongTensor[R])
            with window i's features at ``pooled[inverse[i]]``.
        """
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess(self, image: ImageLike) -> Tensor:
        """RGB uint8 ``[H, W, 3]`` (numpy or tensor) -> normalised ``Tensor[3, H, W]`` on device."""
        if isinstance(image, Tensor):
            image = image.cpu().numpy()
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image must be an RGB uint8 array [H, W, 3], got {image.dtype} {image.shape}"
            )
        return self.backbone.preprocess(image).to(self.device)

    def window_scores(self, fc7: Tensor, cls_logits: Optional[Tensor] = None) -> Tensor:
        """Tensor[U, K] class scores: SVM margins, or softmax probabilities without background."""
        if self.config.test.classifier == "svm":
            if self.svms is None:
                raise ValueError("this model has no SVMs: use test.classifier=softmax")
            return self.svms.scores(fc7)
        if self.config.test.classifier != "softmax":
            raise ValueError(
                f"test.classifier must be 'svm' or 'softmax', got {self.config.test.classifier!r}"
            )
        if cls_logits is None:
            cls_logits = self.head.cls_score(fc7)
        return torch.softmax(cls_logits, dim=1)[:, 1:]

    def train(self, mode: bool = True) -> "WindowDetector":
        """Switch the head's dropout; the frozen backbone always stays in eval mode (SPP-net
        fine-tunes only the fc layers, so its batch-norm statistics must not move)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def configure_test_head(self, head: nn.Module) -> nn.Module:
        """``with_settings`` hook, called on the new configured copy with the float32 head
        (possibly compressed) it is about to make fast: returns the head to convert and may set
        the copy's own test-time input layout to match (``SPPDetector``). Here: ``head``."""
        return head

    def with_settings(
        self,
        test: Optional[TestConfig] = None,
        scales: Optional[Sequence[int]] = None,
        **test_fields: Any,
    ) -> "WindowDetector":
        """A new detector with other test settings, sharing this one's weights.

        Args:
            test: replaces ``config.test`` as a whole.
            scales: replaces ``config.model.scales`` (shorter sides of the test pyramid).
            **test_fields: single ``TestConfig`` fields (``score_thresh=0``, ``svd_fc6=1024``,
                ``classifier="softmax"``, ``fast_head="int8"``), applied after ``test``.
        Returns:
            A detector whose config holds the new settings. When the SVD ranks or
            ``fast_head`` differ from this detector's, its head is a compressed and/or
            lower-precision copy (Fast R-CNN's truncated SVD of fc6/fc7; ``fast_head.py``);
            when ``fast_conv`` differs, its backbone is a copy (``fast_conv.py``); this
            detector is left exactly as it was. The two share parameters
            tensors otherwise, so move a copy (``copy.deepcopy``) to another device, not this.
        Raises:
            ValueError: an unknown test field, or SVD ranks asked of an already compressed head.
        """
        test = dataclasses.replace(test or self.config.test, **test_fields)
        model = self.config.model
        if scales is not None:
            model = dataclasses.replace(model, scales=tuple(int(s) for s in scales))
        out = copy.copy(self)
        # nn.Module keeps its children in dicts: give the copy its own, so that replacing the
        # head of one never changes the other.
        out._modules = dict(self._modules)
        out._parameters = dict(self._parameters)
        out._buffers = dict(self._buffers)
        out.config = self.config.replace(test=test, model=model)
        want = (int(test.svd_fc6), int(test.svd_fc7))
        have_fast = getattr(self.head, "fast_mode", "off")
        if (want, test.fast_head) != (self.head.svd_ranks, have_fast):
            if self.head.svd_ranks != (0, 0) or have_fast != "off":
                raise ValueError(
                    f"fc layers already compressed to ranks {self.head.svd_ranks} / "
                    f"fast_head {have_fast!r}; ask the float32 detector for {want} / "
                    f"{test.fast_head!r}"
                )
            head = self.head
            if want != (0, 0):
                stats = None
                if test.svd_method == "responses":
                    check_head_stats(self.head_stats, *want)
                    stats = self.head_stats
                elif test.svd_method != "weights":
                    raise ValueError(
                        f"svd_method must be 'weights' or 'responses', got {test.svd_method!r}"
                    )
                head = copy.deepcopy(self.head).compress(*want, stats=stats)
            out.head = build_fast_head(out.configure_test_head(head), test.fast_head)
        if test.fast_conv != getattr(self.backbone, "fast_conv", "off"):
            if getattr(self.backbone, "fast_conv", "off") != "off":
                raise ValueError("ask the detector with the original backbone for fast_conv")
            out.backbone = fast_backbone(self.backbone, test.fast_conv)
        return out

    @torch.no_grad()
    def detect(
        self,
        image: ImageLike,
        proposals: Union[np.ndarray, Tensor],
        timer: Optional[StageTimer] = None,
    ) -> Detections:
        """Detect objects in one image (py-faster-rcnn's ``im_detect(net, im, boxes)``).

        Independent of train/eval mode (no dropout, frozen backbone); changes nothing in the
        detector. ``inference.predictor.Predictor`` adds the proposals step.

        Args:
            image: RGB uint8 ``[H, W, 3]``.
            proposals (Tensor[R, 4] or float32 array): xyxy in pixels of ``image``.
            timer: collects per-stage wall time (``preprocess``, ``conv``, ``pool``, ``fc``,
                ``classify``, ``bbox_reg``, ``nms``).
        Returns:
            Detections in pixels of ``image`` (empty, with the right shapes, when nothing scores
            above ``test.score_thresh``).
        Raises:
            ValueError: ``config.test`` asks for SVD ranks this head does not have (use
                ``with_settings``), or for SVMs a model without them.
        """
        timer = timer or null_timer()
        want = (int(self.config.test.svd_fc6), int(self.config.test.svd_fc7))
        fast = (self.config.test.fast_head, self.config.test.fast_conv)
        have = (getattr(self.head, "fast_mode", "off"), getattr(self.backbone, "fast_conv", "off"))
        if want != self.head.svd_ranks or fast != have:
            raise ValueError(
                f"config.test asks for SVD ranks {want} and fast_head/fast_conv {fast} but the "
                f"model has {self.head.svd_ranks} and {have}: build the detector with "
                "with_settings()"
            )
        h, w = int(image.shape[0]), int(image.shape[1])
        windows = torch.as_tensor(np.asarray(proposals), dtype=torch.float32).reshape(-1, 4)
        windows = clip_boxes_to_image(windows, (h, w)).to(self.device)
        keep = (windows[:, 2] > windows[:, 0]) & (windows[:, 3] > windows[:, 1])
        windows = windows[keep]
        if windows.shape[0] == 0:
            return Detections.empty((h, w))
        with timer("preprocess"):
            x = self.preprocess(image)
        pooled, inverse = self.compute_pooled(x, windows, timer)
        with timer("fc"):
            fc7, logits = self.head.predict(pooled)
        with timer("classify"):
            scores = self.window_scores(fc7, logits)[inverse]  # [R, K]
        with timer("bbox_reg"):
            boxes = windows[:, None, :].expand(-1, self.num_classes, 4)
            if self.config.test.bbox_reg and self.bbox_regressor is not None:
                boxes = self._regress(pooled, inverse, scores, boxes, (h, w))
        with timer("nms"):
            dets = self.postprocess(boxes, scores, (h, w))
        return dets.to("cpu")

    def _regress(self, pooled, inverse: Tensor, scores: Tensor, boxes: Tensor, image_hw) -> Tensor:
        """Class-specific boxes ``[R, K, 4]``: ``boxes`` moved by the regressor's deltas for the
        windows that score above ``test.score_thresh`` in some class, clipped to the image.

        Only those windows can be kept (``postprocess``), and with SVM margins most windows
        score below the threshold in every class: regressing them alone gives the same
        detections for a fraction of the regressor's work. The others keep their boxes.
        """
        live = torch.nonzero((scores > self.config.test.score_thresh).any(dim=1)).flatten()
        rows, row_of = torch.unique(inverse[live], return_inverse=True)
        deltas = self.bbox_regressor.predict_deltas(pooled[rows])[row_of]  # [L, K, 4]
        moved = self.bbox_regressor.box_coder.apply_deltas(
            deltas.reshape(-1, 4), boxes[live].reshape(-1, 4)
        )
        out = boxes.clone()
        out[live] = clip_boxes_to_image(moved, image_hw).reshape(-1, self.num_classes, 4)
        return out

    def postprocess(self, boxes: Tensor, scores: Tensor, image_size: Tuple[int, int]) -> Detections:
        """Threshold, per-class NMS, then the per-class and per-image caps.

        Args:
            boxes (Tensor[R, K, 4]): class-specific boxes in image pixels.
            scores (Tensor[R, K]): class scores.
        Returns:
            Detections sorted by decreasing score.
        """
        cfg = self.config.test
        num_classes = scores.shape[1]
        labels = torch.arange(num_classes, device=scores.device).expand_as(scores)
        mask = scores > cfg.score_thresh
        boxes, scores, labels = boxes[mask], scores[mask], labels[mask]
        keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)  # by decreasing score
        if cfg.max_per_class > 0 and keep.numel():
            # R-CNN / SPP_net / Fast R-CNN keep the top 100 of each class in each image.
            keep = keep[rank_within_group(labels[keep]) < cfg.max_per_class]
        if cfg.max_per_image > 0:
            keep = keep[: cfg.max_per_image]
        return Detections(boxes[keep].float(), scores[keep].float(), labels[keep], image_size)

    # -- saving ------------------------------------------------------------------------------
    def state_for_saving(self) -> Dict[str, Any]:
        if self.head.svd_ranks != (0, 0) or not isinstance(self.head, FCHead):
            raise ValueError(
                "save the model before compressing its fc layers (test.svd_*, test.fast_head)"
            )
        if getattr(self.backbone, "fast_conv", "off") != "off":
            raise ValueError("save the model before converting its conv layers (test.fast_conv)")
        return {
            "format": MODEL_FORMAT,
            "method": self.method,
            "config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "backbone": {
                "name": self.backbone.name,
                "build_kwargs": dict(self.backbone.build_kwargs),
                "state_dict": {k: v.cpu() for k, v in self.backbone.state_dict().items()},
            },
            "head": {k: v.cpu() for k, v in self.head.state_dict().items()},
            "svms": None if self.svms is None else self.svms.state_dict(),
            "bbox_regressor": (
                None if self.bbox_regressor is None else self.bbox_regressor.state_dict()
            ),
            "head_stats": self.head_stats,
        }

    def save(self, path: Union[str, Path]) -> Path:
        """Write one self-contained file (config, classes, all weights; plain types and tensors
        only, see ``serialization``), atomically. ``build.load_detector`` reads it."""
        return save_file(self.state_for_saving(), path)
