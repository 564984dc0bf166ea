"""Colours, object textures and cluttered backgrounds of the plain toy VOC set.

Colours are drawn in HSV: objects take vivid colours, the background muted ones, so that only an
object's shape (and not its colour) tells the classes apart.
"""

from __future__ import annotations

import cv2
import numpy as np

from spp_detect.datasets.toy_shapes import SUB_BITS

__all__ = ["hsv_to_rgb", "texture", "background"]


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    px = np.uint8([[[round(h * 179) % 180, round(s * 255), round(v * 255)]]])
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _vivid(rng: np.random.Generator) -> np.ndarray:
    return hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))


def _muted(rng: np.random.Generator) -> np.ndarray:
    return hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.25, 0.85))


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 [h, w, 3] fill for one object: solid, stripes, noise, gradient or checker."""
    a, b = _vivid(rng), _vivid(rng)
    kind = rng.choice(["solid", "stripes", "noise", "gradient", "checker"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "solid":
        t = np.zeros((h, w), np.float32)
    elif kind == "stripes":
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(4, 10)
        t = ((xx * np.cos(ang) + yy * np.sin(ang)) // (period / 2) % 2).astype(np.float32)
    elif kind == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        p = xx * np.cos(ang) + yy * np.sin(ang)
        t = (p - p.min()) / max(float(np.ptp(p)), 1.0)
    elif kind == "checker":
        cell = int(rng.integers(4, 9))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:
        t = np.zeros((h, w), np.float32)
    tex = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    if kind == "noise":
        tex = tex + rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(10, 25)
    return tex


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 [h, w, 3]: smooth colour field + soft blobs + thin lines (muted colours)."""
    gh, gw = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    grid = np.stack([_muted(rng) for _ in range(gh * gw)]).reshape(gh, gw, 3)
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(3, 9))):  # irregular soft blobs: clutter, not shapes
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        n = 16
        r = rng.uniform(8, 0.25 * min(h, w)) * rng.uniform(0.6, 1.4, size=n)
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
        sigma = rng.uniform(2, 5)
        # Work in the blob's window (padded for the blur) rather than on the whole image.
        x0, y0 = (np.floor(pts.min(0) - 3 * sigma).astype(int)).clip(0)
        x1, y1 = np.minimum(np.ceil(pts.max(0) + 3 * sigma).astype(int), [w, h])
        if x1 <= x0 or y1 <= y0:
            continue
        layer = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(
            layer,
            [np.round((pts - [x0, y0]) * (1 << SUB_BITS)).astype(np.int32)],
            255,
            cv2.LINE_8,
            SUB_BITS,
        )
        alpha = cv2.GaussianBlur(layer, (0, 0), sigma).astype(np.float32)[..., None]
        alpha *= rng.uniform(0.3, 0.6) / 255
        win = img[y0:y1, x0:x1]
        win += (_muted(rng) - win) * alpha
    for _ in range(int(rng.integers(4, 14))):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        color = tuple(float(c) for c in _muted(rng))
        cv2.line(img, p1, p2, color, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img + rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(3, 10)
