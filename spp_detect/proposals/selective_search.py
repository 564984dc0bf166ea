"""Selective search (Uijlings et al., IJCV 2013) object proposals, via OpenCV's
``cv2.ximgproc.segmentation`` (opencv-contrib), as used by R-CNN and SPP-net (sec. 4.1: the
"fast" mode, about 2,000 windows per image).

Threads: OpenCV's selective search runs on one core (its graph segmentation and hierarchical
grouping have no parallel loops), so this module leaves ``cv2.setNumThreads`` alone; the speed-up
comes from running images in parallel processes (``proposals.cache.compute_proposals``), whose
workers call ``cv2.setNumThreads(1)`` so that the colour conversions and resizes do not
oversubscribe the cores.

Determinism: OpenCV ranks the regions by ``rand() * level`` (the "pseudo random sorting" of the
paper) with the C library's global ``rand()``, so the order of the windows, and so which ones
survive ``max_proposals``, would depend on what ran before in the process. We call the C
library's ``srand(seed)`` right before ``process()`` so the same image always gives the same
windows in the same order, in any process (best effort: skipped where the C library cannot be
reached through ctypes; concurrent calls from several threads of one process race on that state).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Optional

import cv2
import numpy as np

__all__ = ["DEFAULT_BASE_K", "DEFAULT_INC_K", "DEFAULT_MIN_SIZE", "MODES", "selective_search"]

logger = logging.getLogger(__name__)

MODES = ("fast", "quality")

# R-CNN's selective_search_boxes.m: "filter out boxes which have a width/height smaller than
# minBoxWidth (default = 20 pixels)".
DEFAULT_MIN_SIZE = 20

# Felzenszwalb-Huttenlocher thresholds k. R-CNN's fast mode (selective_search_boxes.m) uses
# k = 50, 100 with HSV and Lab; OpenCV's fast mode runs base_k, base_k + inc_k, base_k + 2 inc_k
# (quality: up to base_k + 4 inc_k), with defaults 150, 150. Starting at R-CNN's k = 50 gives
# about 1,300 to 2,400 windows per 500x375 photo, near the ~2,000 of the papers, where
# OpenCV's defaults give 350 to 1,400; the cost is about 15% more time.
DEFAULT_BASE_K = 50
DEFAULT_INC_K = 50

# Images with a side below this are too small for a graph segmentation to mean anything:
# the whole image is the only window.
_MIN_SEGMENT_SIDE = 8

_libc = None


def _seed_c_rand(seed: int) -> None:
    """``srand(seed)`` in the C library that OpenCV's ``rand()`` uses (see module docstring)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        except (OSError, TypeError):  # no shared C library to reach: order stays unseeded
            _libc = False
    if _libc:
        try:
            _libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
        except AttributeError:
            pass


def selective_search(
    image: np.ndarray,
    mode: str = "fast",
    max_proposals: Optional[int] = 2000,
    min_size: float = DEFAULT_MIN_SIZE,
    resize_to: Optional[int] = None,
    seed: int = 0,
    base_k: int = DEFAULT_BASE_K,
    inc_k: int = DEFAULT_INC_K,
) -> np.ndarray:
    """Selective search windows of one image.

    Args:
        image: np.ndarray[H, W, 3] uint8 RGB (as ``datasets.images.read_image`` returns), or
            [H, W] / [H, W, 1] grayscale, or [H, W, 4] RGBA (alpha ignored).
        mode: "fast" (the mode of R-CNN and SPP-net; OpenCV's version: HSV and Lab colour
            spaces, three k values, two similarity strategies) or "quality" (five colour
            spaces, five k values, four strategies: about 3x slower, more windows).
        max_proposals: keep the first this many windows (OpenCV's order is a rough ranking:
            it sorts the regions by ``rand() * hierarchy level``, small levels first);
            ``None``: all.
        min_size: drop windows whose width or height is below this many pixels of the input
            image (R-CNN: 20).
        resize_to: if given and ``max(H, W)`` is larger, segment a copy downscaled so that its
            longer side is ``resize_to`` pixels (selective search time grows faster than
            linearly with the pixel count) and scale the windows back to the input image;
            windows are then only as precise as the downscaled pixels.
        seed: seeds the ranking's random numbers (same seed, same order).
        base_k, inc_k: graph-segmentation thresholds ``k = base_k + i * inc_k`` (i < 3 in fast
            mode, i < 5 in quality mode); larger k, fewer and larger initial regions.
    Returns:
        np.ndarray[R, 4] float32, xyxy in the continuous pixel frame of the input image
        (a window covering pixel columns ``x .. x + w - 1`` is ``[x, x + w)``), inside
        ``[0, W] x [0, H]``, no two equal, at most ``max_proposals`` rows, in OpenCV's order.
        ``R`` may be 0.
    Raises:
        ValueError: an image of the wrong dtype or shape, or an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_proposals is not None and max_proposals < 0:
        raise ValueError(f"max_proposals must be >= 0 or None, got {max_proposals}")
    if base_k < 1 or inc_k < 1:  # inc_k = 0 would loop forever inside OpenCV
        raise ValueError(f"base_k and inc_k must be >= 1, got {base_k}, {inc_k}")
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    if max_proposals == 0:
        return np.zeros((0, 4), dtype=np.float32)

    if min(h, w) < _MIN_SEGMENT_SIDE:
        boxes = np.array([[0, 0, w, h]], dtype=np.float32)
    else:
        scale = 1.0
        work = rgb
        if resize_to is not None and max(h, w) > resize_to:
            scale = resize_to / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            work = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        # OpenCV converts its base image with COLOR_BGR2HSV / COLOR_BGR2Lab: give it BGR.
        ss.setBaseImage(np.ascontiguousarray(work[:, :, ::-1]))
        if mode == "fast":
            ss.switchToSelectiveSearchFast(int(base_k), int(inc_k))
        else:
            ss.switchToSelectiveSearchQuality(int(base_k), int(inc_k))
        _seed_c_rand(seed)
        rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)
        # cv::Rect (x, y, w, h) of a region covers pixels x .. x + w - 1: continuous [x, x + w).
        boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
        if scale != 1.0:
            boxes /= scale
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        boxes = boxes.astype(np.float32)

    wh = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[(wh[:, 0] >= min_size) & (wh[:, 1] >= min_size)]
    boxes = _unique_rows_first(boxes)
    if max_proposals is not None:
        boxes = boxes[:max_proposals]
    return np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must be [H, W, 3] RGB (or gray / RGBA), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has no pixels: shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


def _unique_rows_first(boxes: np.ndarray) -> np.ndarray:
    """Rows of ``boxes`` without repeats, each kept at its first occurrence, order kept."""
    if boxes.shape[0] == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]
