"""Pooled window features of training images, for both detectors.

Training reads window features many times (fine-tuning draws mini-batches, SVM mining and box
regression make a pass each), so each method gets a source that avoids repeating its expensive
part: SPP-net keeps each image's conv maps (``ConvFeatureCache``) and pools windows from them;
the R-CNN baseline (``spp_detect.engine.rcnn_features``) caches each window's pooled vector.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..datasets.records import ImageRecord
from ..modeling.pyramid import random_scales
from .features import ConvFeatureCache

__all__ = ["SPPWindowFeatures"]


class SPPWindowFeatures:
    """Pooled features of windows of training images, from cached conv maps.

    Args:
        detector: the ``SPPDetector`` being trained.
        cache: its ``ConvFeatureCache``.
    """

    def __init__(self, detector, cache: ConvFeatureCache) -> None:
        self.detector = detector
        self.cache = cache

    def prepare(self, images) -> dict:
        """Compute the conv maps missing from the cache (``images``: ``TrainingImage`` list);
        returns the cache statistics."""
        return self.cache.build([im.record for im in images])

    def pooled(
        self,
        record: ImageRecord,
        windows: Tensor,
        rng: Optional[np.random.Generator] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Pooled features of ``windows`` of one training image.

        Args:
            record: the image.
            windows (Tensor[R, 4]): xyxy in pixels of the original image.
            rng: given, each window is pooled at a random scale (the SPP_net code's training
                rule); ``None`` uses the test-time rule (area closest to 224^2, sec. 4.1).
        Returns:
            pooled (Tensor[U, D]) float32 on the detector's device and inverse (LongTensor[R]).
        """
        device = self.detector.device
        maps, factors = self.cache.get(record)
        maps = [m.to(device=device, dtype=torch.float32) for m in maps]
        windows = windows.to(device)
        scale_idx = None
        if rng is not None and len(maps) > 1:
            scale_idx = random_scales(windows.shape[0], len(maps), rng)
        with torch.no_grad():
            return self.detector.pool_from_maps(maps, factors, windows, scale_idx)
