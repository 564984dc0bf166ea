"""The per-region R-CNN baseline (Girshick et al. 2014) with the same backbone and heads.

Every window is cropped with 16 pixels of context padding, warped to the backbone's input size
and run through the whole backbone on its own; its conv5 is pooled with the same pyramid as
SPP-net's windows (``model.levels``, 6x6, 3x3, 2x2, 1x1), so both methods share one head shape:
the paper's same-model comparison (SPP-net Table 10, "R-CNN" with the SPP model's layers). It then
goes through the same fc6/fc7 head, SVMs, box regression and NMS. The only difference from
``SPPDetector`` is ``compute_pooled``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import roi_align

from ..structures import unique_boxes
from ..utils import StageTimer
from .base import WindowDetector
from .spp import SpatialPyramidPooling

__all__ = ["RCNNDetector", "context_windows", "warp_windows"]


def context_windows(windows: Tensor, context_pad: int, warp_size: int) -> Tensor:
    """Enlarge windows so that, once warped to ``warp_size``, ``context_pad`` pixels of the
    warped image are context around the original window (R-CNN sec. 2.1 / appendix A:
    "we dilate the tight bounding box so that at the warped size there are exactly p = 16
    pixels of warped image context around the original box").

    Args:
        windows (Tensor[R, 4]): xyxy in image pixels.
    Returns:
        Tensor[R, 4]: xyxy in image pixels (may extend beyond the image; that area is filled
        with the mean colour, i.e. zero after normalisation).
    """
    if context_pad <= 0:
        return windows
    scale = warp_size / float(warp_size - 2 * context_pad)
    centre = (windows[:, :2] + windows[:, 2:]) / 2
    half = (windows[:, 2:] - windows[:, :2]) / 2 * scale
    return torch.cat([centre - half, centre + half], dim=1)


def warp_windows(image: Tensor, windows: Tensor, size: int) -> Tensor:
    """Crop each window from the image and warp it (anisotropically) to ``size x size``.

    Bilinear sampling of the window's extent (``roi_align`` with one sample per output pixel,
    ``aligned=True`` so pixel centres sit at ``+0.5``); samples outside the image are zero, the
    mean colour in normalised space, as in R-CNN's mean-padded crops.

    Args:
        image (Tensor[3, H, W]): normalised image.
        windows (Tensor[R, 4]): xyxy in image pixels.
    Returns:
        Tensor[R, 3, size, size].
    """
    rois = torch.cat([windows.new_zeros(windows.shape[0], 1), windows], dim=1)
    return roi_align(image[None], rois.to(image.dtype), (size, size), 1.0, 1, aligned=True)


class RCNNDetector(WindowDetector):
    """R-CNN: crop, warp and run the full backbone per window.

    ``config.model.context_pad`` (16) sets the context; crops are processed in chunks of
    ``crop_batch`` windows to bound memory.
    """

    method = "rcnn"
    crop_batch = 64

    def __init__(self, backbone, class_names, config):
        super().__init__(backbone, class_names, config)
        self.pool5 = SpatialPyramidPooling(tuple(config.model.levels))

    @property
    def pooled_dim(self) -> int:
        return int(self.backbone.out_channels) * sum(n * n for n in self.config.model.levels)

    @property
    def warp_size(self) -> int:
        return int(self.backbone.input_size)

    def pool_windows(self, image: Tensor, windows: Tensor, timer: StageTimer) -> Tensor:
        """Pooled features of each window (no deduplication).

        Args:
            image (Tensor[3, H, W]): normalised, on the model's device.
            windows (Tensor[R, 4]): xyxy in image pixels.
        Returns:
            Tensor[R, C * sum(n * n for n in model.levels)].
        """
        out = image.new_empty(windows.shape[0], self.pooled_dim)
        padded = context_windows(windows, self.config.model.context_pad, self.warp_size)
        for start in range(0, windows.shape[0], self.crop_batch):
            chunk = padded[start : start + self.crop_batch]
            with timer("crop_warp"):
                crops = warp_windows(image, chunk, self.warp_size)
            with timer("conv"):
                conv = self.backbone(crops)
            with timer("pool"):
                out[start : start + chunk.shape[0]] = self.pool5(conv)
        return out

    def compute_pooled(
        self, image: Tensor, windows: Tensor, timer: StageTimer
    ) -> Tuple[Tensor, Tensor]:
        # R-CNN's own trick: windows on the same pixels give the same features.
        keep, inverse = unique_boxes(windows)
        return self.pool_windows(image, windows[keep], timer), inverse
