"""The conv networks behind the backbones: ZF-5, EfficientNet-Lite0, VGG-16 and AlexNet.

Each is built with random weights (``*_model`` / ``*_features``: the network an ImageNet file
loads into) and cut to its conv trunk (``*_trunk``: the layers up to the SPP input).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from spp_detect.errors import UserInputError
from spp_detect.modeling.geometry import spatial_layers, walk_geometry

__all__ = [
    "default_init",
    "efficientnet_trunk",
    "timm_lite0",
    "torchvision_features",
    "torchvision_model",
    "torchvision_trunk",
    "vgg_init",
    "whole",
    "zf5_model",
]


def zf5_model() -> nn.Sequential:
    """ZF-5 (SPP-net sec. 3.1, Zeiler & Fergus's fast model): padding floor(k/2) everywhere,
    so conv5 cells are centred at 16 * j (appendix A). Local response normalisation is left out."""

    def conv(cin: int, cout: int, k: int, s: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)

    body = nn.Sequential(
        OrderedDict(
            [
                ("conv1", conv(3, 96, 7, 2)),
                ("relu1", nn.ReLU(inplace=True)),
                ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
                ("conv2", conv(96, 256, 5, 2)),
                ("relu2", nn.ReLU(inplace=True)),
                ("pool2", nn.MaxPool2d(3, stride=2, padding=1)),
                ("conv3", conv(256, 384, 3, 1)),
                ("relu3", nn.ReLU(inplace=True)),
                ("conv4", conv(384, 384, 3, 1)),
                ("relu4", nn.ReLU(inplace=True)),
                ("conv5", conv(384, 256, 3, 1)),
                ("relu5", nn.ReLU(inplace=True)),
            ]
        )
    )
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return body


def whole(model: nn.Module) -> nn.Module:
    """ZF-5 is only conv layers: the whole network is the trunk."""
    return model


def timm_lite0() -> nn.Module:
    """timm's random-init EfficientNet-Lite0 classifier.

    timm pads floor(k/2) symmetrically (centre offset 0); Google trained with TF "SAME" padding,
    which differs only by a pixel at stride-2 layers on even sizes and would make the offset
    depend on the input size.
    """
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False)


class _EfficientNetTrunk(nn.Module):
    """timm EfficientNet cut after its last stage at the wanted stride (plus the 1x1 head at 32)."""

    def __init__(self, model: nn.Module, num_stages: int, head: bool):
        super().__init__()
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        self.blocks = model.blocks[:num_stages]
        self.conv_head = model.conv_head if head else None
        self.bn2 = model.bn2 if head else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        if self.conv_head is not None:
            x = self.bn2(self.conv_head(x))
        return x


def efficientnet_trunk(model: nn.Module, out_stride: int) -> nn.Module:
    if out_stride not in (8, 16, 32):
        raise UserInputError(
            f"efficientnet_lite0: out_stride must be 8, 16 or 32, got {out_stride}"
        )
    # The last stage whose cumulative stride is out_stride, found by walking the layers.
    stem = spatial_layers(model.conv_stem)
    num_stages = max(
        i + 1
        for i in range(len(model.blocks))
        if walk_geometry(stem + spatial_layers(model.blocks[: i + 1]))[0] == out_stride
    )
    return _EfficientNetTrunk(model, num_stages, head=out_stride == 32)


def vgg_init(conv: nn.Conv2d) -> None:
    """torchvision's VGG init."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)


def default_init(conv: nn.Conv2d) -> None:
    """PyTorch's default init (torchvision's AlexNet keeps it)."""
    conv.reset_parameters()


def torchvision_features(name: str, init: Callable[[nn.Conv2d], None]) -> nn.Module:
    """Only the conv part (``.features``) of a torchvision network, with torchvision's init.

    The fc layers (over 100M parameters for VGG-16) are built on the meta device and dropped:
    initialising them would cost seconds for nothing.
    """
    import torchvision

    with torch.device("meta"):
        full = getattr(torchvision.models, name)(weights=None)
    holder = nn.Module()
    holder.features = full.features.to_empty(device="cpu")
    for m in holder.features.modules():
        if isinstance(m, nn.Conv2d):
            init(m)
    return holder


def torchvision_model(name: str) -> nn.Module:
    """The whole random-init torchvision classifier."""
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def torchvision_trunk(model: nn.Module) -> nn.Module:
    # Conv features up to the last conv + ReLU, without the last max pool (SPP replaces it):
    # VGG-16 conv5_3 and AlexNet conv5, both at stride 16.
    last_relu = max(i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU))
    return model.features[: last_relu + 1]
