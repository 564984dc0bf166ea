"""Pascal VOC's pixel convention: the only ``+1`` / ``-1`` box conversion of spp_detect.

VOC (and its devkit) number pixels from 1 and make ``xmax`` inclusive: a box ``(xmin, ymin,
xmax, ymax)`` covers pixel columns ``xmin .. xmax``, ``xmax - xmin + 1`` of them. In the
continuous frame of ``spp_detect.structures.boxes``, pixel column ``xmin`` (1-based) spans
``[xmin - 1, xmin)`` and column ``xmax`` ends at ``xmax``; so::

    x1 = xmin - 1,  y1 = ymin - 1,  x2 = xmax,  y2 = ymax      (voc_pixels_to_boxes)
    xmin = x1 + 1,  ymin = y1 + 1,  xmax = x2,  ymax = y2      (boxes_to_voc_pixels)

and the devkit's width ``xmax - xmin + 1`` is ``x2 - x1``. ``spp_detect/datasets/voc.py``
converts annotations with ``voc_pixels_to_boxes`` when it loads them;
``spp_detect/evaluation/voc.py`` and ``voc_results.py`` convert back with
``boxes_to_voc_pixels`` to compute AP by the devkit's rules and to write results files.
A leaf module (numpy only), so datasets and evaluation share it without importing each other.
"""

from __future__ import annotations

import numpy as np

__all__ = ["boxes_to_voc_pixels", "voc_pixels_to_boxes"]


def boxes_to_voc_pixels(boxes) -> np.ndarray:
    """Continuous xyxy -> VOC 1-based inclusive pixels.

    Args:
        boxes (array-like or Tensor [N, 4]): xyxy in the continuous frame, pixels of the image.
    Returns:
        float32 [N, 4]: ``(xmin, ymin, xmax, ymax)``. Computed in float32, identically for
        in-memory evaluation and for the results files, so both give the same AP.
    """
    if hasattr(boxes, "detach"):
        boxes = boxes.detach().cpu().numpy()
    out = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    out[:, :2] += np.float32(1.0)
    return out


def voc_pixels_to_boxes(boxes_voc) -> np.ndarray:
    """VOC 1-based inclusive pixels -> continuous xyxy.

    Args:
        boxes_voc (array-like [N, 4]): ``(xmin, ymin, xmax, ymax)`` as in an annotation or a
            results file.
    Returns:
        float32 [N, 4]: xyxy in the continuous frame (subtracted in float64, rounded once).
    """
    out = np.array(boxes_voc, dtype=np.float64).reshape(-1, 4)
    out[:, :2] -= 1.0
    return out.astype(np.float32)
