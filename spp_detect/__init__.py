"""spp_detect: SPP-net (He, Zhang, Ren, Sun 2014) for classification and object detection.

The public names are imported lazily so that ``import spp_detect`` stays cheap (the CLI starts
fast) and a missing optional dependency only fails where it is used.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SpatialPyramidPooling": "spp_detect.modeling.spp",
    "project_windows": "spp_detect.modeling.window_pool",
    "pool_windows": "spp_detect.modeling.window_pool",
    "build_backbone": "spp_detect.modeling.backbones",
    "SPPClassifier": "spp_detect.modeling.spp_classifier",
    "SPPDetector": "spp_detect.modeling.spp_net",
    "RCNNDetector": "spp_detect.modeling.rcnn",
    "Detections": "spp_detect.structures.detections",
    "Predictor": "spp_detect.inference.predictor",
    "ProposalSettings": "spp_detect.proposals.settings",
    "build_detector": "spp_detect.modeling.build",
    "load_detector": "spp_detect.modeling.build",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spp_detect' has no attribute {name!r}")


def __dir__():
    return __all__
