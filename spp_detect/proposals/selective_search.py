"""Selective search (Uijlings et al., IJCV 2013) object proposals, via OpenCV's
``cv2.ximgproc.segmentation`` (opencv-contrib), as used by R-CNN and SPP-net (sec. 4.1: the
"fast" mode, about 2,000 windows per image).

Threads: OpenCV's selective search runs on one core (its graph segmentation and hierarchical
grouping have no parallel loops), so this module leaves ``cv2.setNumThreads`` alone; the speed-up
comes from running images in parallel processes (``proposals.compute.compute_proposals``), whose
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

import cv2
import numpy as np

from spp_detect.proposals.settings import ProposalSettings

__all__ = ["selective_search"]

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


def selective_search(image: np.ndarray, settings: ProposalSettings) -> np.ndarray:
    """Selective search windows of one image.

    Args:
        image: np.ndarray[H, W, 3] uint8 RGB (as ``datasets.images.read_image`` returns), or
            [H, W] / [H, W, 1] grayscale, or [H, W, 4] RGBA (alpha ignored).
        settings: how windows are proposed (see :class:`ProposalSettings`): ``mode`` "fast"
            (R-CNN and SPP-net; OpenCV's version: HSV and Lab, three k values, two similarity
            strategies) or "quality"; ``max_proposals`` keeps the first windows in OpenCV's
            order (a rough ranking: regions sorted by ``rand() * hierarchy level``, small
            levels first); ``min_size`` drops windows whose width or height is below it, in
            pixels of the input image; ``resize_to`` segments a copy whose longer side is that
            long when the image is larger and scales the windows back (they are then only as
            precise as the downscaled pixels); ``seed`` seeds the ranking; ``base_k``,
            ``inc_k`` are the graph-segmentation thresholds.
    Returns:
        np.ndarray[R, 4] float32, xyxy in the continuous pixel frame of the input image
        (a window covering pixel columns ``x .. x + w - 1`` is ``[x, x + w)``), inside
        ``[0, W] x [0, H]``, no two equal, at most ``max_proposals`` rows, in OpenCV's order.
        ``R`` may be 0.
    Raises:
        ValueError: an image of the wrong dtype or shape.
    """
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    if min(h, w) < _MIN_SEGMENT_SIDE:
        boxes = np.array([[0, 0, w, h]], dtype=np.float32)
    else:
        boxes = _segment(rgb, settings)
    wh = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[(wh[:, 0] >= settings.min_size) & (wh[:, 1] >= settings.min_size)]
    boxes = _unique_rows_first(boxes)[: settings.limit]
    return np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)


def _segment(rgb: np.ndarray, settings: ProposalSettings) -> np.ndarray:
    """OpenCV's selective search on ``rgb`` (downscaled to ``resize_to``), float32 xyxy in
    pixels of ``rgb``."""
    h, w = rgb.shape[:2]
    scale, work = 1.0, rgb
    if settings.resize_to and max(h, w) > settings.resize_to:
        scale = settings.resize_to / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        work = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    # OpenCV converts its base image with COLOR_BGR2HSV / COLOR_BGR2Lab: give it BGR.
    ss.setBaseImage(np.ascontiguousarray(work[:, :, ::-1]))
    if settings.mode == "fast":
        ss.switchToSelectiveSearchFast(int(settings.base_k), int(settings.inc_k))
    else:
        ss.switchToSelectiveSearchQuality(int(settings.base_k), int(settings.inc_k))
    _seed_c_rand(settings.seed)
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)
    # cv::Rect (x, y, w, h) of a region covers pixels x .. x + w - 1: continuous [x, x + w).
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    if scale != 1.0:
        boxes /= scale
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return boxes.astype(np.float32)


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
