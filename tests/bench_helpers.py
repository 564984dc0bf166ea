"""Test-only helpers for detectors without training: random SVM and box-regression heads of the
trained shapes, set directly (no training run), so that ``detect`` and ``save`` work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from spp_detect.modeling.base import WindowDetector
from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.modeling.svm import LinearSVMs


@torch.no_grad()
def random_heads(
    detector: WindowDetector, seed: int = 0, svm_bias: float = -1.0, svm_std: float = 0.01
) -> WindowDetector:
    """Set random SVMs (weight ``[K, hidden]`` ~ N(0, svm_std), bias ``svm_bias``) and a random
    box regressor (``[K, pooled_dim + 1, 4]``, tiny) on ``detector`` and return it.

    A negative bias lets few windows through the SVM threshold; a positive one keeps nearly all
    of them, so that a test gets detections (and a non-zero AP) from an untrained network.
    """
    gen = torch.Generator().manual_seed(seed)
    k, hidden, dim = detector.num_classes, detector.head.hidden, detector.pooled_dim
    svms = LinearSVMs(k)
    svms.reset_weights(hidden)
    svms.weight = torch.randn(k, hidden, generator=gen) * svm_std
    svms.bias = torch.full((k,), float(svm_bias))
    svms.trained = torch.ones(k, dtype=torch.bool)
    svms.set_feature_scale(1.0)
    reg = BoxRegressor(k)
    reg.weight = torch.randn(k, dim + 1, 4, generator=gen) * 1e-4
    reg.trained = torch.ones(k, dtype=torch.bool)
    detector.svms = svms.to(detector.device)
    detector.bbox_regressor = reg.to(detector.device)
    return detector


def load_tool(path: Path, name: str):
    """A ``tools/*.py`` script imported as a module (the tools are not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
