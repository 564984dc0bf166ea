"""The SPP-net detector (sec. 4): one conv pass per image and scale, each window projected onto
the conv5 map (appendix A) and pyramid-pooled (6x6, 3x3, 2x2, 1x1), then the shared head of
``base.WindowDetector``."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..utils import StageTimer, null_timer
from .base import WindowDetector
from .pyramid import choose_scales, resize_image, scale_factors
from .window_pool import pool_windows, project_windows

__all__ = ["SPPDetector", "ZF5_INWARD_OFFSET"]

# The SPP_net code's inward move of each window edge for ZF-5 (stride 16), in pixels.
ZF5_INWARD_OFFSET = 6.5


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

    @property
    def inward_offset(self) -> float:
        """Pixels each window edge moves inward before projection (``model.inward_offset``;
        None: the SPP_net code's 6.5 px for ZF-5's stride 16, as a fraction of the stride)."""
        d = self.config.model.inward_offset
        return ZF5_INWARD_OFFSET * self.backbone.stride / 16.0 if d is None else float(d)

    @property
    def code_target(self) -> float:
        """``sz_conv_standard * step_standard`` of the SPP_net code's scale rule: the conv5 size
        of a ``target_size`` input times the stride (ZF-5: 13 * 16 = 208)."""
        t = self.config.model.target_size
        cells = self.backbone.feature_size(t, t)[0]
        return float(cells * self.backbone.stride)

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
            scale_idx (LongTensor[R]): the scale of each window; ``None`` applies
                ``config.model.scale_rule`` (sec. 4.1: resized area closest to 224^2).
        Returns:
            pooled (Tensor[U, C * 50]) for the U distinct (scale, cells) pairs, inverse
            (LongTensor[R]). Windows that fall on the same cells share features, so fc6/fc7
            run once for them.
        """
        if scale_idx is None:
            m = self.config.model
            scale_idx = choose_scales(
                windows, factors, m.target_size, rule=m.scale_rule, code_target=self.code_target
            )
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
                    inward=self.inward_offset,
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
