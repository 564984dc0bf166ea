"""Shapes of the plain toy VOC set: one polygon generator per class, rasterised and placed.

Each class of :data:`TOY_CLASSES` is drawn as contours in a unit frame (``[-1, 1]`` extent),
scaled to a random extent and aspect ratio, rotated and placed in the image (``place``);
``rasterize`` fills layered contours at 1/16-pixel precision. The instance-split mode's styles
(``datasets/toy_style_shapes.py``) use the same ``rasterize`` and ``place``.
"""

from __future__ import annotations

from typing import List, Tuple

import cv2
import numpy as np

__all__ = [
    "TOY_CLASSES",
    "SUB_BITS",
    "max_rotation",
    "plain_aspect",
    "plain_layers",
    "place",
    "rasterize",
]

TOY_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")

SUB_BITS = 4  # cv2.fillPoly fractional bits: vertices at 1/16 pixel
_SMALL_EXTENT = (10, 18)  # px, size range of the deliberately tiny (difficult) objects
_SMALL_P = 0.12  # chance that an object is tiny (difficult)
_TRUNCATED_P = 0.15  # chance that an object is centred near the border (usually truncated)


# --------------------------------------------------------------------------------------------
# shapes: polygons in a unit frame ([-1, 1] extent), scaled, rotated and placed later


def _ellipse(n: int = 72) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_shape(name: str, rng: np.random.Generator) -> List[np.ndarray]:
    """Contours in the unit frame; the first is filled, any further ones are holes."""
    if name == "circle":
        return [_ellipse()]
    if name == "ring":
        return [_ellipse(), _ellipse() * rng.uniform(0.45, 0.65)]
    if name == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)]
    if name == "triangle":
        t = np.deg2rad(-90.0 + np.array([0.0, 120.0, 240.0]))
        return [np.stack([np.cos(t), np.sin(t)], axis=1)]
    if name == "star":
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)]
    if name == "cross":
        a = rng.uniform(0.28, 0.42)  # half-width of an arm
        # One quarter (top arm's right edge to the right arm's top edge), turned four times.
        turns = [np.array([[a, -1], [a, -a], [1, -a]])]
        for _ in range(3):  # (x, y) -> (-y, x)
            turns.append(turns[-1] @ np.array([[0.0, 1.0], [-1.0, 0.0]]))
        return [np.concatenate(turns)]
    raise ValueError(f"unknown toy class {name!r}; known: {', '.join(TOY_CLASSES)}")


def max_rotation(name: str) -> float:
    # Squares and crosses stay roughly axis-aligned (a 45-degree square reads as a diamond).
    return {"square": 15.0, "cross": 20.0, "circle": 90.0, "ring": 90.0}.get(name, 180.0)


def rasterize(layers: List[Tuple[np.ndarray, int]]) -> Tuple[np.ndarray, int, int]:
    """Fill ``(contour, value)`` layers (image-frame float vertices) in order ->
    (uint8 label map, x0, y0) of their bounding box; label 0 is outside the shape."""
    allpts = np.concatenate([c for c, _ in layers])
    x0, y0 = np.floor(allpts.min(0)).astype(int) - 1
    x1, y1 = np.ceil(allpts.max(0)).astype(int) + 2
    labels = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    for c, value in layers:
        pts = np.round((c - [x0, y0]) * (1 << SUB_BITS)).astype(np.int32)
        cv2.fillPoly(labels, [pts], int(value), cv2.LINE_8, SUB_BITS)
    return labels, int(x0), int(y0)


def plain_aspect(rng: np.random.Generator) -> float:
    return float(np.exp(rng.uniform(np.log(0.67), np.log(1.5))))


def plain_layers(name: str):
    """The plain mode's shape of a class as layers: the first contour filled, the rest holes."""
    return lambda rng: [(c, 1 if i == 0 else 0) for i, c in enumerate(_unit_shape(name, rng))]


def place(
    rng: np.random.Generator,
    w: int,
    h: int,
    layers,
    max_rotation: float,
    draw_aspect=plain_aspect,
) -> Tuple[np.ndarray, bool, bool]:
    """Draw one shape's geometry -> (full-image uint8 label map, truncated, small).

    ``layers(rng)`` gives the shape's unit-frame ``(contour, value)`` layers; the label map holds
    their values (0 outside the shape) and its non-zero pixels are the object's mask.
    """
    small = rng.random() < _SMALL_P
    if small:
        extent = rng.uniform(*_SMALL_EXTENT)
    else:  # log-uniform from 28 px to 60% of the shorter side
        extent = float(np.exp(rng.uniform(np.log(28), np.log(0.6 * min(w, h)))))
    aspect = draw_aspect(rng)
    sx, sy = extent / 2 * np.sqrt(aspect), extent / 2 / np.sqrt(aspect)
    cx, cy = rng.uniform(sx, w - sx), rng.uniform(sy, h - sy)
    if rng.random() < _TRUNCATED_P:  # centre near one border: 20% to 60% of the shape falls outside
        side, inward = int(rng.integers(4)), rng.uniform(-0.2, 0.6)
        if side == 0:
            cx = inward * sx
        elif side == 1:
            cx = w - inward * sx
        elif side == 2:
            cy = inward * sy
        else:
            cy = h - inward * sy
    rot = np.deg2rad(rng.uniform(-1, 1) * max_rotation)
    rmat = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    local, x0, y0 = rasterize([((c * [sx, sy]) @ rmat.T + [cx, cy], v) for c, v in layers(rng)])
    full = np.zeros((h, w), dtype=np.uint8)
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + local.shape[1], w), min(y0 + local.shape[0], h)
    if ix1 > ix0 and iy1 > iy0:
        full[iy0:iy1, ix0:ix1] = local[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    truncated = int(np.count_nonzero(full)) < int(np.count_nonzero(local))
    return full, truncated, small
