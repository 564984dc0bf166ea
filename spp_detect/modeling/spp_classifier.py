"""The SPP-net image classifier (sec. 3): conv layers -> spatial pyramid pooling -> fc6, fc7 ->
class scores, taking images of any size and aspect (SPP gives a fixed-length vector)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from spp_detect.errors import UserInputError
from spp_detect.modeling.backbones import Backbone, build_backbone
from spp_detect.modeling.spp import SpatialPyramidPooling
from spp_detect.serialization import load_file, save_file

__all__ = ["SPPClassifier", "CLASSIFIER_FORMAT", "save_classifier", "load_classifier"]

logger = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "spp_detect-classifier/1"


class SPPClassifier(nn.Module):
    """backbone -> SPP -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> cls_score.

    Args:
        backbone: a ``Backbone`` (``out_channels`` gives the pooled width).
        num_classes: K classes (no background: this is image classification).
        levels: pyramid levels; the paper's classification pyramids are (4, 3, 2, 1) and
            (6, 3, 2, 1) (sec. 3.1), the latter also being the detection pyramid.
        hidden: width of fc6 and fc7 (4096 in the paper).
        dropout: dropout probability after fc6 and fc7 (0.5 as in the paper's networks).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        levels: Sequence[int] = (6, 3, 2, 1),
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1 or int(hidden) < 1:
            raise ValueError(f"num_classes and hidden must be >= 1, got {num_classes}, {hidden}")
        self.backbone = backbone
        self.spp = SpatialPyramidPooling(levels)
        self.num_classes, self.hidden, self.dropout_p = int(num_classes), int(hidden), dropout
        in_features = self.spp.output_dim(backbone.out_channels)
        self.fc6 = nn.Linear(in_features, self.hidden)
        self.fc7 = nn.Linear(self.hidden, self.hidden)
        self.cls_score = nn.Linear(self.hidden, self.num_classes)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # ReLU follows
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # Gaussian, std 0.01 (sec. 4.1)
        nn.init.zeros_(self.cls_score.bias)

    @property
    def levels(self):
        return self.spp.levels

    def pooled(self, images: Tensor) -> Tensor:
        """``Tensor[N, 3, H, W]`` normalised (one size per batch) -> ``Tensor[N, C * bins]``."""
        return self.spp(self.backbone(images))

    def fc7_features(self, images: Tensor) -> Tensor:
        """``Tensor[N, 3, H, W]`` -> fc7 after ReLU (and dropout in training), ``[N, hidden]``."""
        x = self.dropout(torch.relu(self.fc6(self.pooled(images))))
        return self.dropout(torch.relu(self.fc7(x)))

    def forward(self, images: Tensor) -> Tensor:
        """``Tensor[N, 3, H, W]`` normalised images, any ``H, W >= backbone.min_input_size``
        -> class logits ``Tensor[N, num_classes]``."""
        return self.cls_score(self.fc7_features(images))

    def build_config(self) -> Dict[str, Any]:
        """What ``load_classifier`` needs to rebuild this architecture."""
        return {
            "backbone": self.backbone.name,
            "build_kwargs": dict(self.backbone.build_kwargs),
            "num_classes": self.num_classes,
            "levels": list(self.levels),
            "hidden": self.hidden,
            "dropout": self.dropout_p,
        }


def save_classifier(
    model: SPPClassifier,
    path: Union[str, Path],
    class_names: Optional[Sequence[str]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``{"format", "config", "class_names", "model": state_dict, **extra}`` atomically
    (plain types and tensors only: ``extra`` must hold nothing else).

    The file also serves as ``build_backbone(name, pretrained=path)`` (its ``backbone.`` keys).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "format": CLASSIFIER_FORMAT,
        "config": model.build_config(),
        "class_names": list(class_names) if class_names is not None else None,
        "model": state,
        **(extra or {}),
    }
    return save_file(obj, path)


def load_classifier(path: Union[str, Path], map_location: str = "cpu") -> SPPClassifier:
    """Rebuild an ``SPPClassifier`` saved by ``save_classifier`` (eval mode; ``.class_names``)."""
    obj = load_file(path, what="classifier file", map_location=map_location)
    if not isinstance(obj, dict) or obj.get("format") != CLASSIFIER_FORMAT:
        raise UserInputError(f"{path}: not an spp_detect classifier ({CLASSIFIER_FORMAT})")
    cfg = obj["config"]
    backbone = build_backbone(cfg["backbone"], pretrained=False, **cfg["build_kwargs"])
    model = SPPClassifier(
        backbone, cfg["num_classes"], cfg["levels"], cfg["hidden"], cfg["dropout"]
    )
    model.load_state_dict(obj["model"])
    model.class_names = obj.get("class_names")
    return model.eval()
