"""Boxes (``Tensor[N, 4]`` xyxy helpers) and the per-image ``Detections`` result."""

from .boxes import (
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    nonempty,
    pairwise_iou,
    remove_small_boxes,
    unique_boxes,
)
from .detections import Detections

__all__ = [
    "Detections",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "nonempty",
    "pairwise_iou",
    "remove_small_boxes",
    "unique_boxes",
]
