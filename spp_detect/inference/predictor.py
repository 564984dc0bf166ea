"""``Predictor``: image -> proposals -> detections for one image at a time, as detectron2's
``DefaultPredictor``. It owns the request: proposal settings, test settings and the device, and
never changes the detector it was given."""

from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..config import TestConfig
from ..modeling.base import WindowDetector
from ..proposals.selective_search import selective_search
from ..proposals.settings import ProposalSettings
from ..structures import Detections
from ..utils import StageTimer, null_timer

__all__ = ["Predictor"]


class Predictor:
    """Detect objects in single images with fixed settings.

    Args:
        detector: a trained detector (``load_detector``); left exactly as it was: the
            predictor works on a configured copy (``with_settings``), deep-copied first when
            ``device`` differs from the detector's.
        proposals: how windows are proposed; default: the settings the model was trained with
            (``detector.config.proposals``).
        test: test settings (classifier, thresholds, NMS, caps, SVD ranks); default: the model's.
        scales: test scales (shorter sides); default: the model's ``config.model.scales``.
        device: where the network runs; default: where the detector is.
        **test_fields: single ``TestConfig`` fields, e.g. ``score_thresh=0.0``.
    """

    def __init__(
        self,
        detector: WindowDetector,
        proposals: Optional[ProposalSettings] = None,
        test: Optional[TestConfig] = None,
        scales: Optional[Sequence[int]] = None,
        device: Optional[Union[str, torch.device]] = None,
        **test_fields,
    ) -> None:
        if device is not None and torch.device(device) != detector.device:
            detector = copy.deepcopy(detector).to(device)
        self.detector = detector.with_settings(test=test, scales=scales, **test_fields)
        self.proposal_settings = proposals or detector.config.proposals

    @property
    def class_names(self):
        return self.detector.class_names

    def propose(self, image: np.ndarray) -> np.ndarray:
        """Selective-search windows, float32 ``[R, 4]`` xyxy in pixels of ``image``."""
        return selective_search(image, self.proposal_settings)

    def __call__(
        self,
        image: np.ndarray,
        proposals: Optional[np.ndarray] = None,
        timer: Optional[StageTimer] = None,
    ) -> Detections:
        """Detections of one RGB uint8 ``[H, W, 3]`` image, in its pixels.

        Args:
            proposals: precomputed windows (xyxy in pixels of ``image``); ``None``: selective
                search with ``proposal_settings``.
            timer: per-stage wall time, ``proposals`` included.
        """
        timer = timer or null_timer()
        if proposals is None:
            with timer("proposals"):
                proposals = self.propose(image)
        return self.detector.detect(image, proposals, timer=timer)
