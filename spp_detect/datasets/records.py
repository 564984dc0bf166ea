"""The annotation record of one image, shared by the VOC reader, the toy generator, training and
evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: _empty(np.float32, 0, 4))
    labels: np.ndarray = field(default_factory=lambda: _empty(np.int64, 0))
    difficult: np.ndarray = field(default_factory=lambda: _empty(bool, 0))
    truncated: np.ndarray = field(default_factory=lambda: _empty(bool, 0))

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        g = self.boxes.shape[0]
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(g)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(g)
        self.truncated = np.asarray(self.truncated, dtype=bool).reshape(g)
