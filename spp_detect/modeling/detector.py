"""The SPP-net detector (sec. 4): one conv pass per scale, per-window pyramid pooling, fc6/fc7,
per-class linear SVMs (or the fine-tuned softmax), box regression and per-class NMS.

``WindowDetector`` holds what SPP-net and the R-CNN baseline share (head, SVMs, regressor,
post-processing, saving); the two differ only in how a window becomes a pooled feature vector
(``compute_pooled``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..config import DetectorConfig
from ..structures import Detections, batched_nms, clip_boxes
from ..utils import StageTimer, atomic_torch_save, null_timer
from .backbones import build_backbone
from .box_regression import BoxRegressor, apply_deltas
from .head import FCHead
from .pyramid import choose_scales, resize_image, scale_factors
from .svm import LinearSVMs
from .window_pool import pool_windows, project_windows

__all__ = ["WindowDetector", "SPPDetector", "load_detector", "MODEL_FORMAT"]

logger = logging.getLogger(__name__)

MODEL_FORMAT = "spp_detect-model/1"

ImageLike = Union[np.ndarray, Tensor]


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
            hidden=config.model.hidden,
            dropout=config.model.dropout,
            init_std=config.finetune.init_std,
        )
        self.svms: Optional[LinearSVMs] = None
        self.bbox_regressor: Optional[BoxRegressor] = None

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

    @torch.no_grad()
    def detect(
        self,
        image: ImageLike,
        proposals: Optional[Union[np.ndarray, Tensor]] = None,
        timer: Optional[StageTimer] = None,
    ) -> Detections:
        """Detect objects in one image.

        Args:
            image: RGB uint8 ``[H, W, 3]``.
            proposals (Tensor[R, 4] or float32 array): xyxy in pixels of ``image``; ``None``
                runs selective search with the config's proposal settings.
            timer: collects per-stage wall time (``proposals``, ``conv``, ``pool``, ``fc``,
                ``classify``, ``bbox_reg``, ``nms``).
        Returns:
            Detections in pixels of ``image`` (empty, with the right shapes, when nothing scores
            above ``test.score_thresh``).
        """
        timer = timer or null_timer()
        self.eval()
        self._apply_svd()
        h, w = int(image.shape[0]), int(image.shape[1])
        if proposals is None:
            from ..proposals.selective_search import selective_search

            cfg = self.config.proposals
            with timer("proposals"):
                proposals = selective_search(
                    np.asarray(image),
                    mode=cfg.mode,
                    max_proposals=cfg.max_proposals,
                    min_size=cfg.min_size,
                )
        windows = torch.as_tensor(np.asarray(proposals), dtype=torch.float32).reshape(-1, 4)
        windows = clip_boxes(windows, (h, w)).to(self.device)
        keep = (windows[:, 2] > windows[:, 0]) & (windows[:, 3] > windows[:, 1])
        windows = windows[keep]
        if windows.shape[0] == 0:
            return Detections.empty((h, w))
        with timer("preprocess"):
            x = self.preprocess(image)
        pooled, inverse = self.compute_pooled(x, windows, timer)
        with timer("fc"):
            fc7, logits = self.head(pooled)
        with timer("classify"):
            scores = self.window_scores(fc7, logits)[inverse]  # [R, K]
        with timer("bbox_reg"):
            boxes = windows[:, None, :].expand(-1, self.num_classes, 4)
            if self.config.test.bbox_reg and self.bbox_regressor is not None:
                deltas = self.bbox_regressor.predict_deltas(pooled)[inverse]  # [R, K, 4]
                boxes = apply_deltas(deltas.reshape(-1, 4), boxes.reshape(-1, 4))
                boxes = clip_boxes(boxes, (h, w)).reshape(-1, self.num_classes, 4)
        with timer("nms"):
            dets = self.postprocess(boxes, scores, (h, w))
        return dets.to("cpu")

    def _apply_svd(self) -> None:
        """Compress fc6/fc7 by truncated SVD once, when ``test.svd_fc6/svd_fc7`` ask for it."""
        want = (self.config.test.svd_fc6, self.config.test.svd_fc7)
        if want == self.head.svd_ranks:
            return
        if self.head.svd_ranks != (0, 0):
            raise ValueError(
                f"fc layers already compressed to ranks {self.head.svd_ranks}; reload the model "
                f"to use ranks {want}"
            )
        self.head.compress(*want)

    def postprocess(self, boxes: Tensor, scores: Tensor, image_size: Tuple[int, int]) -> Detections:
        """Threshold, per-class NMS and the per-image cap.

        Args:
            boxes (Tensor[R, K, 4]): class-specific boxes in image pixels.
            scores (Tensor[R, K]): class scores.
        """
        cfg = self.config.test
        num_classes = scores.shape[1]
        labels = torch.arange(num_classes, device=scores.device).expand_as(scores)
        mask = scores > cfg.score_thresh
        boxes, scores, labels = boxes[mask], scores[mask], labels[mask]
        keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)
        keep = keep[: cfg.max_per_image] if cfg.max_per_image > 0 else keep
        return Detections(boxes[keep].float(), scores[keep].float(), labels[keep], image_size)

    # -- saving ------------------------------------------------------------------------------
    def state_for_saving(self) -> Dict[str, Any]:
        if self.head.svd_ranks != (0, 0):
            raise ValueError("save the model before compressing its fc layers (test.svd_*)")
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
        }

    def save(self, path: Union[str, Path]) -> Path:
        """Write one self-contained file (config, classes, all weights), atomically."""
        path = Path(path)
        atomic_torch_save(self.state_for_saving(), path)
        return path


class SPPDetector(WindowDetector):
    """SPP-net: conv5 once per image and scale, windows pooled from the feature map.

    Args:
        backbone: conv layers with ``stride``, ``center_offset`` and ``out_channels``.
        class_names: the K object classes.
        config: ``model.scales`` (shorter sides of the pyramid), ``model.levels`` (6, 3, 2, 1).
    """

    method = "spp"

    @property
    def pooled_dim(self) -> int:
        return int(self.backbone.out_channels) * sum(n * n for n in self.config.model.levels)

    def scale_factors(self, image_hw: Tuple[int, int]) -> List[float]:
        return scale_factors(image_hw, self.config.model.scales, self.config.model.max_size)

    def conv_maps(self, image: Tensor, timer: Optional[StageTimer] = None) -> List[Tensor]:
        """conv5 of the image at every scale of the pyramid.

        Args:
            image (Tensor[3, H, W]): preprocessed, on the model's device.
        Returns:
            One ``Tensor[C, h_s, w_s]`` per scale, in ``config.model.scales`` order.
        """
        timer = timer or null_timer()
        maps = []
        with timer("conv"):
            for f in self.scale_factors(tuple(image.shape[-2:])):
                maps.append(self.backbone(resize_image(image, f)[None])[0])
        return maps

    def pool_from_maps(
        self,
        maps: Sequence[Tensor],
        factors: Sequence[float],
        windows: Tensor,
        scale_idx: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Project each window onto its scale's map (appendix A) and pyramid-pool it.

        Args:
            maps: ``Tensor[C, h_s, w_s]`` per scale.
            factors: resize factor per scale (original pixels -> resized pixels).
            windows (Tensor[R, 4]): xyxy in pixels of the original image.
            scale_idx (LongTensor[R]): the scale of each window; ``None`` picks the one whose
                resized area is closest to 224^2 (sec. 4.1).
        Returns:
            pooled (Tensor[U, C * 50]) for the U distinct (scale, cells) pairs, inverse
            (LongTensor[R]). Windows that fall on the same cells share features, so fc6/fc7
            run once for them.
        """
        if scale_idx is None:
            scale_idx = choose_scales(windows, factors, self.config.model.target_size)
        scale_idx = scale_idx.to(windows.device)
        keys = torch.zeros(windows.shape[0], 5, dtype=torch.long, device=windows.device)
        keys[:, 0] = scale_idx
        for s, (fmap, f) in enumerate(zip(maps, factors)):
            idx = torch.nonzero(scale_idx == s).flatten()
            if idx.numel():
                keys[idx, 1:] = project_windows(
                    windows[idx] * f,
                    self.backbone.stride,
                    self.backbone.center_offset,
                    tuple(fmap.shape[-2:]),
                )
        uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
        if len(maps) == 1:  # one scale: no scatter into a second [U, D] buffer
            return pool_windows(maps[0], uniq[:, 1:], self.config.model.levels), inverse
        pooled = maps[0].new_empty(uniq.shape[0], self.pooled_dim)
        for s, fmap in enumerate(maps):
            idx = torch.nonzero(uniq[:, 0] == s).flatten()
            if idx.numel():
                pooled[idx] = pool_windows(fmap, uniq[idx, 1:], self.config.model.levels)
        return pooled, inverse

    def compute_pooled(
        self, image: Tensor, windows: Tensor, timer: StageTimer
    ) -> Tuple[Tensor, Tensor]:
        maps = self.conv_maps(image, timer)
        with timer("pool"):
            factors = self.scale_factors(tuple(image.shape[-2:]))
            pooled, inverse = self.pool_from_maps(maps, factors, windows)
            pooled = pooled.float()
        return pooled, inverse


def _detector_classes() -> Dict[str, type]:
    from .rcnn import RCNNDetector

    return {"spp": SPPDetector, "rcnn": RCNNDetector}


def build_detector(
    method: str,
    class_names: Sequence[str],
    config: DetectorConfig,
    pretrained: Union[bool, str] = True,
) -> WindowDetector:
    """A fresh detector (``method`` "spp" or "rcnn") with the configured backbone."""
    classes = _detector_classes()
    if method not in classes:
        raise ValueError(f"method must be one of {sorted(classes)}, got {method!r}")
    backbone = build_backbone(
        config.model.backbone, pretrained=pretrained, **dict(config.model.backbone_kwargs)
    )
    return classes[method](backbone, class_names, config)


def load_detector(
    path: Union[str, Path], device: Union[str, torch.device] = "cpu"
) -> WindowDetector:
    """Load a ``model.pt`` written by ``WindowDetector.save``.

    Raises:
        ValueError: the file is missing or is not a spp_detect model.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: model file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: not a readable model file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a spp_detect model (expected format {MODEL_FORMAT})")
    try:
        config = DetectorConfig.from_dict(state["config"])
        classes = _detector_classes()
        bb = state["backbone"]
        backbone = build_backbone(bb["name"], pretrained=False, **bb["build_kwargs"])
        backbone.load_state_dict(bb["state_dict"])
        detector = classes[state["method"]](backbone, state["class_names"], config)
        detector.head.load_state_dict(state["head"])
        if state.get("svms") is not None:
            detector.svms = LinearSVMs.from_state_dict(state["svms"])
        if state.get("bbox_regressor") is not None:
            detector.bbox_regressor = BoxRegressor.from_state_dict(state["bbox_regressor"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: incompatible model file (written by another spp_detect version?): {reason}"
        ) from None
    return detector.to(device).eval()
