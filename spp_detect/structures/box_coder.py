"""R-CNN's box parameterisation as a small coder (torchvision's ``BoxCoder``, detectron2's
``Box2BoxTransform``).

R-CNN appendix C, in the continuous frame of ``spp_detect.structures.boxes`` (``w = x2 - x1``,
centre ``x1 + w / 2``, no ``+1``), for a window ``P`` and its target ``G``::

    dx = wx (gx - px) / pw    dy = wy (gy - py) / ph    dw = ww log(gw / pw)    dh = wh log(gh / ph)

R-CNN and SPP-net use weights ``(1, 1, 1, 1)``.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["BoxCoder", "DEFAULT_SCALE_CLAMP"]

# Largest dw / dh applied: a box may grow at most 1000/16 times. detectron2 and torchvision clamp
# the log-scale deltas to log(1000 / 16) so that exp() cannot overflow on a bad prediction.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be Tensor[N, 4] xyxy, got shape {tuple(boxes.shape)}")


class BoxCoder:
    """Encodes window -> target corrections as deltas and applies them back.

    Args:
        weights: ``(wx, wy, ww, wh)`` multiply the four deltas (1 in R-CNN / SPP-net).
        scale_clamp: ``apply_deltas`` clamps dw and dh to at most this (``log(1000 / 16)``).
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder: weights must be 4 numbers, got {tuple(weights)}")
        self.weights: Tuple[float, float, float, float] = tuple(float(v) for v in weights)
        self.scale_clamp = float(scale_clamp)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, scale_clamp={self.scale_clamp:.4g})"

    def get_deltas(self, src: Tensor, dst: Tensor) -> Tensor:
        """The deltas that move ``src`` onto ``dst``.

        Args:
            src (Tensor[N, 4]): windows, xyxy in pixels (any frame shared with ``dst``); widths
                and heights must be positive.
            dst (Tensor[N, 4]): their targets (ground-truth boxes), same frame; positive sizes.
        Returns:
            Tensor[N, 4]: ``(dx, dy, dw, dh)`` in the dtype of ``src``.
        Raises:
            ValueError: wrong shapes, or a box with a non-positive width or height (log undefined).
        """
        _check_boxes(src, "src")
        _check_boxes(dst, "dst")
        if src.shape[0] != dst.shape[0]:
            raise ValueError(f"src and dst differ in length: {src.shape[0]} vs {dst.shape[0]}")
        dst = dst.to(src.dtype)
        src_w = src[:, 2] - src[:, 0]
        src_h = src[:, 3] - src[:, 1]
        dst_w = dst[:, 2] - dst[:, 0]
        dst_h = dst[:, 3] - dst[:, 1]
        if src.shape[0] and bool(((src_w <= 0) | (src_h <= 0) | (dst_w <= 0) | (dst_h <= 0)).any()):
            raise ValueError("get_deltas: every src and dst box needs a positive width and height")
        src_cx = src[:, 0] + 0.5 * src_w
        src_cy = src[:, 1] + 0.5 * src_h
        dst_cx = dst[:, 0] + 0.5 * dst_w
        dst_cy = dst[:, 1] + 0.5 * dst_h
        wx, wy, ww, wh = self.weights
        dx = wx * (dst_cx - src_cx) / src_w
        dy = wy * (dst_cy - src_cy) / src_h
        dw = ww * torch.log(dst_w / src_w)
        dh = wh * torch.log(dst_h / src_h)
        return torch.stack([dx, dy, dw, dh], dim=1)

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Move boxes by deltas (the inverse of ``get_deltas``).

        Args:
            deltas (Tensor[N, 4] or Tensor[N, 4K]): ``(dx, dy, dw, dh)``, or K class-specific
                groups laid out ``[dx_0, dy_0, dw_0, dh_0, dx_1, ...]``.
            boxes (Tensor[N, 4]): xyxy in pixels; zero-size boxes stay zero-size (no NaN).
        Returns:
            Tensor of the shape of ``deltas``: xyxy boxes in the frame of ``boxes``, dtype of
            ``deltas``. Not clipped to the image.
        """
        _check_boxes(boxes, "boxes")
        if deltas.ndim != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"deltas must be Tensor[N, 4K] with N = {boxes.shape[0]}, got {tuple(deltas.shape)}"
            )
        if not deltas.is_floating_point():
            raise ValueError(f"deltas must be floating point, got {deltas.dtype}")
        boxes = boxes.to(deltas.dtype)
        widths = (boxes[:, 2] - boxes[:, 0])[:, None]
        heights = (boxes[:, 3] - boxes[:, 1])[:, None]
        ctr_x = boxes[:, 0:1] + 0.5 * widths
        ctr_y = boxes[:, 1:2] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pred_cx = dx * widths + ctr_x
        pred_cy = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights
        out = torch.stack(
            [
                pred_cx - 0.5 * pred_w,
                pred_cy - 0.5 * pred_h,
                pred_cx + 0.5 * pred_w,
                pred_cy + 0.5 * pred_h,
            ],
            dim=2,
        )
        return out.reshape(deltas.shape)
