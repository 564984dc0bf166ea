"""Boxes (``Tensor[N, 4]`` xyxy helpers torchvision lacks, R-CNN's ``BoxCoder``), VOC's pixel
convention and the per-image ``Detections`` result.

Area, IoU, clipping, small-box removal and NMS: use ``torchvision.ops`` directly.
"""

from .box_coder import BoxCoder
from .boxes import matched_box_iou, unique_boxes
from .detections import Detections
from .voc_pixels import boxes_to_voc_pixels, voc_pixels_to_boxes

__all__ = [
    "BoxCoder",
    "Detections",
    "boxes_to_voc_pixels",
    "matched_box_iou",
    "unique_boxes",
    "voc_pixels_to_boxes",
]
