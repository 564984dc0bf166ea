"""Texture families of the toy VOC generator's instance-split mode.

A family is ``"<pattern>/<palette>"``: training objects take :data:`TRAIN_TEXTURES`, test
objects :data:`TEST_TEXTURES` (other patterns, other palettes), so that a test object's fill
differs from every training object's.
"""

from __future__ import annotations

import cv2
import numpy as np

from spp_detect.datasets.toy_paint import hsv_to_rgb
from spp_detect.datasets.toy_style_shapes import DETAIL

__all__ = ["TRAIN_TEXTURES", "TEST_TEXTURES", "paint_fill", "edge_fade"]

_SOFT_EDGE_FLOOR = 0.2  # soft-edged style: opacity at the outline (1 at the centre)


# Palettes as HSV ranges (s, v); hue is free. Disjoint: vivid has s >= 0.6 and v >= 0.5, pastel
# s <= 0.5, deep v <= 0.45. (The background's colours are muted: s 0.05-0.35.)
_PALETTES = {
    "vivid": ((0.6, 1.0), (0.5, 1.0)),
    "pastel": ((0.3, 0.5), (0.85, 1.0)),
    "deep": ((0.7, 1.0), (0.28, 0.45)),
}
TRAIN_TEXTURES = tuple(f"{p}/vivid" for p in ("solid", "stripes", "checker", "gradient"))
TEST_TEXTURES = tuple(
    f"{p}/{c}" for p in ("dots", "crosshatch", "mottled", "waves") for c in ("pastel", "deep")
)


def _colour(rng: np.random.Generator, palette: str, hue: float) -> np.ndarray:
    (s0, s1), (v0, v1) = _PALETTES[palette]
    return hsv_to_rgb(hue % 1.0, rng.uniform(s0, s1), rng.uniform(v0, v1))


def _pattern(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """float32 [h, w] in [0, 1]: where the fill mixes its second colour."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    proj = xx * np.cos(ang) + yy * np.sin(ang)
    if kind == "solid":
        return np.zeros((h, w), np.float32)
    if kind == "stripes":
        return (proj // (rng.uniform(4, 10) / 2) % 2).astype(np.float32)
    if kind == "checker":
        cell = int(rng.integers(4, 9))
        return ((xx // cell + yy // cell) % 2).astype(np.float32)
    if kind == "gradient":
        return (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    if kind == "dots":
        cell = rng.uniform(6, 11)
        r = rng.uniform(0.22, 0.38) * cell
        dx, dy = xx % cell - cell / 2, yy % cell - cell / 2
        return (dx * dx + dy * dy <= r * r).astype(np.float32)
    if kind == "crosshatch":
        period, width = rng.uniform(6, 11), rng.uniform(1.2, 2.2)
        other = -xx * np.sin(ang) + yy * np.cos(ang)
        return ((proj % period < width) | (other % period < width)).astype(np.float32)
    if kind == "mottled":
        t = cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), rng.uniform(1.5, 3))
        return (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    if kind == "waves":
        period, amp = rng.uniform(6, 12), rng.uniform(2, 5)
        other = -xx * np.sin(ang) + yy * np.cos(ang)
        phase = 2 * np.pi * (proj + amp * np.sin(other * 2 * np.pi / (3 * period))) / period
        return (0.5 + 0.5 * np.sin(phase)).astype(np.float32)
    raise ValueError(f"unknown texture pattern {kind!r}")


def paint_fill(rng: np.random.Generator, family: str, labels: np.ndarray) -> np.ndarray:
    """Fill of one object.

    Args:
        family: ``"<pattern>/<palette>"`` from :data:`TRAIN_TEXTURES` or :data:`TEST_TEXTURES`.
        labels: uint8 [h, w], the object's layers in its box (1 fill, 2 detail, 0 elsewhere).
    Returns:
        float32 [h, w, 3] RGB: the pattern in two colours of the palette; detail pixels in a
        third colour of the palette, half the colour wheel away from the first.
    """
    kind, palette = family.split("/")
    h, w = labels.shape
    hue = rng.random()
    a = _colour(rng, palette, hue)
    b = _colour(rng, palette, hue + rng.uniform(0.15, 0.85))
    t = _pattern(rng, kind, h, w)[..., None]
    fill = a[None, None] * (1 - t) + b[None, None] * t
    detail = labels == DETAIL
    if detail.any():
        fill[detail] = _colour(rng, palette, hue + rng.uniform(0.35, 0.65))
    return fill.astype(np.float32)


def edge_fade(mask: np.ndarray) -> np.ndarray:
    """Opacity float32 [h, w] of a soft-edged object: ``_SOFT_EDGE_FLOOR`` on the outline,
    rising to 1 at a third of the object's inner radius (0 outside ``mask``)."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    reach = max(float(dist.max()) / 3.0, 1.0)
    alpha = _SOFT_EDGE_FLOOR + (1 - _SOFT_EDGE_FLOOR) * np.clip(dist / reach, 0.0, 1.0)
    return np.where(mask, alpha, 0.0).astype(np.float32)
