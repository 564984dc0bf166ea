"""The per-image detection result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor


@dataclass
class Detections:
    """Detections of one image.

    Attributes:
        boxes (Tensor[N, 4]): float32 xyxy in pixels of the original image (continuous frame,
            see ``spp_detect.structures.boxes``).
        scores (Tensor[N]): float32 score of each box (SVM margin or softmax probability).
        labels (LongTensor[N]): 0-based index into ``class_names`` (no background class).
        image_size: ``(height, width)`` of the original image.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    image_size: Tuple[int, int]

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.shape != (n, 4) or self.scores.shape != (n,) or self.labels.shape != (n,):
            raise ValueError(
                f"inconsistent detections: boxes {tuple(self.boxes.shape)}, "
                f"scores {tuple(self.scores.shape)}, labels {tuple(self.labels.shape)}"
            )

    @classmethod
    def empty(cls, image_size: Tuple[int, int], device: str | torch.device = "cpu") -> "Detections":
        return cls(
            boxes=torch.zeros(0, 4, device=device),
            scores=torch.zeros(0, device=device),
            labels=torch.zeros(0, dtype=torch.long, device=device),
            image_size=tuple(image_size),
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: str | torch.device) -> "Detections":
        return Detections(
            self.boxes.to(device), self.scores.to(device), self.labels.to(device), self.image_size
        )

    def __getitem__(self, index) -> "Detections":
        return Detections(
            self.boxes[index], self.scores[index], self.labels[index], self.image_size
        )

    def to_dict(self) -> Dict[str, Any]:
        """Plain types and tensors only (what ``serialization.save_file`` accepts)."""
        return {
            "boxes": self.boxes.cpu(),
            "scores": self.scores.cpu(),
            "labels": self.labels.cpu(),
            "image_size": [int(v) for v in self.image_size],
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Detections":
        return cls(data["boxes"], data["scores"], data["labels"], tuple(data["image_size"]))

    def to_list(self, class_names: Sequence[str]) -> List[dict]:
        """JSON-ready ``[{label, score, box: [x1, y1, x2, y2]}]`` (continuous pixel frame)."""
        return [
            {
                "label": class_names[int(label)],
                "score": float(score),
                "box": [float(v) for v in box],
            }
            for box, score, label in zip(
                self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()
            )
        ]
