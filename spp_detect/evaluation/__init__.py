"""Evaluation: Pascal VOC AP (a port of the devkit), COCO AP via pycocotools, reports and plots.

Imports ``structures`` and ``datasets`` only, never ``modeling``. Names are imported lazily so
that ``import spp_detect.evaluation`` does not pull in pycocotools or matplotlib.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "VOCEvaluator": "spp_detect.evaluation.voc",
    "evaluate_voc_results": "spp_detect.evaluation.voc",
    "voc_ap": "spp_detect.evaluation.voc",
    "write_voc_results": "spp_detect.evaluation.voc_results",
    "read_voc_results": "spp_detect.evaluation.voc_results",
    "evaluate_coco": "spp_detect.evaluation.coco",
    "plot_pr_curves": "spp_detect.evaluation.plots",
    "format_ap_table": "spp_detect.evaluation.plots",
    "evaluate_detections": "spp_detect.evaluation.report",
    "evaluate_results_dir": "spp_detect.evaluation.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spp_detect.evaluation' has no attribute {name!r}")


def __dir__():
    return __all__
