"""The annotation record of one image, shared by the VOC reader, the toy generator, training and
evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


def _empty(dtype, *shape) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


@dataclass
class ImageRecord:
    """Ground truth of one image.

    Attributes:
        image_id: the VOC id (file stem), unique within a split.
        path: the image file.
        width, height: image size in pixels, from the annotation.
        boxes (float32 [G, 4]): xyxy in the continuous pixel frame of ``structures.boxes``
            (converted from VOC's 1-based inclusive pixels by the VOC reader).
        labels (int64 [G]): 0-based index into the dataset's ``class_names``.
        difficult (bool [G]): VOC ``difficult`` flag (ignored by evaluation either way).
        truncated (bool [G]): VOC ``truncated`` flag.
        flipped: the image is the horizontal mirror of the file at ``path`` (training
            augmentation, ``mirrored``); boxes are already in the mirrored frame.
        crowd (bool [G]): COCO ``iscrowd`` regions (default all False). The COCO reader also
            marks them ``difficult`` so that VOC AP ignores them; they are never training
            targets.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: _empty(np.float32, 0, 4))
    labels: np.ndarray = field(default_factory=lambda: _empty(np.int64, 0))
    difficult: np.ndarray = field(default_factory=lambda: _empty(bool, 0))
    truncated: np.ndarray = field(default_factory=lambda: _empty(bool, 0))
    flipped: bool = False
    crowd: Optional[np.ndarray] = None  # None: all False

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        g = self.boxes.shape[0]
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(g)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(g)
        self.truncated = np.asarray(self.truncated, dtype=bool).reshape(g)
        crowd = np.zeros(g, dtype=bool) if self.crowd is None else self.crowd
        self.crowd = np.asarray(crowd, dtype=bool).reshape(g)

    def mirrored(self) -> "ImageRecord":
        """The record of this image's horizontal mirror (id ``<id>.flipped``), boxes mirrored:
        ``x1' = W - x2``, ``x2' = W - x1`` (continuous frame, so no ``-1``)."""
        return ImageRecord(
            image_id=f"{self.image_id}.flipped" if not self.flipped else self.image_id[:-8],
            path=self.path,
            width=self.width,
            height=self.height,
            boxes=mirror_boxes(self.boxes, self.width),
            labels=self.labels.copy(),
            difficult=self.difficult.copy(),
            truncated=self.truncated.copy(),
            flipped=not self.flipped,
            crowd=self.crowd.copy(),
        )


def mirror_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """float32 [N, 4] xyxy boxes of an image ``width`` pixels wide, mirrored horizontally."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
