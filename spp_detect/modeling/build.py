"""Building detectors by name and loading saved models.

``DETECTORS`` is the table of methods: "spp" (SPP-net) and "rcnn" (the per-region R-CNN
baseline); both share ``base.WindowDetector``'s head, SVMs and regressors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Type, Union

import torch

from ..config import DetectorConfig
from ..errors import UserInputError
from ..serialization import load_file
from .backbones import build_backbone
from .base import MODEL_FORMAT, WindowDetector
from .box_regression import BoxRegressor
from .rcnn import RCNNDetector
from .spp_net import SPPDetector
from .svm import LinearSVMs

__all__ = ["DETECTORS", "build_detector", "load_detector", "detector_from_state"]

DETECTORS: Dict[str, Type[WindowDetector]] = {"spp": SPPDetector, "rcnn": RCNNDetector}


def build_detector(
    method: str,
    class_names: Sequence[str],
    config: DetectorConfig,
    pretrained: Union[bool, str] = True,
) -> WindowDetector:
    """A fresh detector (``method`` "spp" or "rcnn") with the configured backbone."""
    if method not in DETECTORS:
        raise UserInputError(f"method must be one of {sorted(DETECTORS)}, got {method!r}")
    backbone = build_backbone(
        config.model.backbone, pretrained=pretrained, **dict(config.model.backbone_kwargs)
    )
    return DETECTORS[method](backbone, class_names, config)


def detector_from_state(state: dict) -> WindowDetector:
    """Rebuild a detector from ``WindowDetector.state_for_saving()`` (no weights download)."""
    config = DetectorConfig.from_dict(state["config"])
    bb = state["backbone"]
    backbone = build_backbone(bb["name"], pretrained=False, **bb["build_kwargs"])
    backbone.load_state_dict(bb["state_dict"])
    detector = DETECTORS[state["method"]](backbone, state["class_names"], config)
    detector.head.load_state_dict(state["head"])
    if state.get("svms") is not None:
        detector.svms = LinearSVMs.from_state_dict(state["svms"])
    if state.get("bbox_regressor") is not None:
        detector.bbox_regressor = BoxRegressor.from_state_dict(state["bbox_regressor"])
    detector.head_stats = state.get("head_stats")
    return detector


def load_detector(
    path: Union[str, Path], device: Union[str, torch.device] = "cpu"
) -> WindowDetector:
    """Load a ``model.pt`` written by ``WindowDetector.save``, in eval mode on ``device``, with
    the test settings it was saved with (``with_settings`` gives others).

    The file is read as data only (``serialization.load_file``): a file carrying code is
    refused before anything in it runs.

    Raises:
        UserInputError: the file is missing, unreadable, unsafe or not a spp_detect model.
    """
    path = Path(path)
    state = load_file(path, what="model file")
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise UserInputError(f"{path}: not a spp_detect model (expected format {MODEL_FORMAT})")
    try:
        detector = detector_from_state(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"{path}: incompatible model file (written by another spp_detect version?): {reason}"
        ) from None
    detector = detector.to(device).eval()
    # A config saved with SVD ranks (test.svd_fc6/svd_fc7) gets its compressed head here.
    return detector.with_settings()
