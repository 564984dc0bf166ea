"""Axis-aligned boxes as plain ``Tensor[N, 4]`` float32 ``(x1, y1, x2, y2)``.

The one box convention of spp_detect: continuous pixel coordinates, ``w = x2 - x1``, no ``+1``.
A box ``[x1, x2)`` covers pixels ``x1 .. x2 - 1``. Pascal VOC's 1-based inclusive pixels are
converted to and from this frame only by ``spp_detect/structures/voc_pixels.py`` (used when the
VOC reader loads annotations and when evaluation writes results files and computes AP).

Area, IoU, clipping, small-box removal and NMS come from ``torchvision.ops`` (``box_area``,
``box_iou``, ``clip_boxes_to_image``, ``remove_small_boxes``, ``batched_nms``), which use the same
convention; this module holds only the helpers torchvision lacks.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import box_area

__all__ = ["matched_box_iou", "unique_boxes"]


def _check(boxes: Tensor, name: str = "boxes") -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be Tensor[N, 4] xyxy, got shape {tuple(boxes.shape)}")


def matched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matching rows (``boxes1[i]`` with ``boxes2[i]``), without the ``[N, N]`` matrix
    that ``torchvision.ops.box_iou(boxes1, boxes2).diagonal()`` would build.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[N, 4]): xyxy in the same frame, positive sizes.
    Returns:
        Tensor[N]: IoU in [0, 1]; 0 where the union is empty.
    """
    _check(boxes1, "boxes1")
    _check(boxes2, "boxes2")
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"shapes differ: {tuple(boxes1.shape)} vs {tuple(boxes2.shape)}")
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def unique_boxes(boxes: Tensor, scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Indices of the first occurrence of each distinct box, and the inverse map.

    Boxes are compared after ``round(box * scale)`` (R-CNN's ``unique_boxes`` trick: two windows
    that land on the same pixels, or the same feature cells with ``scale = 1 / stride``, give the
    same features, so the expensive work runs once per distinct box).

    Args:
        boxes (Tensor[N, 4]): any frame.
        scale: multiply before rounding.
    Returns:
        keep (LongTensor[K]): sorted indices of first occurrences.
        inverse (LongTensor[N]): ``boxes[i]`` equals ``boxes[keep[inverse[i]]]`` (after rounding).
    """
    _check(boxes)
    if boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return empty, empty
    keys = torch.round(boxes.double() * scale).long()
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    n = boxes.shape[0]
    order = torch.arange(n, device=boxes.device)
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=boxes.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    # Renumber groups by first occurrence so keep is sorted.
    rank = torch.empty_like(first)
    sorted_first, perm = torch.sort(first)
    rank[perm] = torch.arange(first.numel(), device=boxes.device)
    return sorted_first, rank[inverse]
