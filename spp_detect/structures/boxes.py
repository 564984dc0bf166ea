"""Axis-aligned boxes as plain ``Tensor[N, 4]`` float32 ``(x1, y1, x2, y2)``.

The one box convention of spp_detect: continuous pixel coordinates, ``w = x2 - x1``, no ``+1``.
A box ``[x1, x2)`` covers pixels ``x1 .. x2 - 1``. Pascal VOC's 1-based inclusive pixels are
converted to this frame only in ``spp_detect/datasets/voc.py`` (on load) and back only in
``spp_detect/evaluation/voc.py`` (when results files are written and AP is computed).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms as _tv_batched_nms

__all__ = [
    "box_area",
    "box_iou",
    "pairwise_iou",
    "clip_boxes",
    "nonempty",
    "remove_small_boxes",
    "unique_boxes",
    "batched_nms",
]


def _check(boxes: Tensor, name: str = "boxes") -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be Tensor[N, 4] xyxy, got shape {tuple(boxes.shape)}")


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box.

    Args:
        boxes (Tensor[N, 4]): xyxy, any frame.
    Returns:
        Tensor[N]: ``(x2 - x1) * (y2 - y1)``, zero for inverted boxes.
    """
    _check(boxes)
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    return wh[:, 0] * wh[:, 1]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union of every pair.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): xyxy in the same frame.
    Returns:
        Tensor[N, M]: IoU in [0, 1]; 0 where the union is empty.
    """
    _check(boxes1, "boxes1")
    _check(boxes2, "boxes2")
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matching rows: ``Tensor[N]`` for two ``Tensor[N, 4]``."""
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


def clip_boxes(boxes: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """Clip boxes to an image.

    Args:
        boxes (Tensor[N, 4]): xyxy in pixels of the image.
        image_size: ``(height, width)`` of the image.
    Returns:
        Tensor[N, 4]: a new tensor with x in ``[0, width]`` and y in ``[0, height]``.
    """
    _check(boxes)
    h, w = image_size
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def nonempty(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """BoolTensor[N]: boxes whose width and height both exceed ``min_size``."""
    _check(boxes)
    wh = boxes[:, 2:] - boxes[:, :2]
    return (wh[:, 0] > min_size) & (wh[:, 1] > min_size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """LongTensor[K]: indices of the boxes whose sides are both ``>= min_size`` pixels."""
    _check(boxes)
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (wh[:, 0] >= min_size) & (wh[:, 1] >= min_size)
    return torch.nonzero(keep).flatten()


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


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Per-class greedy non-maximum suppression.

    Args:
        boxes (Tensor[N, 4]): xyxy in pixels of one image.
        scores (Tensor[N]): higher is better.
        labels (LongTensor[N]): boxes of different labels never suppress each other.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box of the same
            label is above this (SPP-net and R-CNN: 0.3).
    Returns:
        LongTensor[K]: indices of the kept boxes, by decreasing score.
    """
    _check(boxes)
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    return _tv_batched_nms(boxes.float(), scores.float(), labels, float(iou_threshold))
