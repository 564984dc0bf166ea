"""A small generated classification set in ImageFolder layout, for tests, CI and quick runs.

``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: one filled shape per image (the
classes of the toy detection set, ``toy_shapes.TOY_CLASSES``: circle, square, triangle, star,
cross, ring) of random colour, size, rotation and stretch, on a noisy gradient background
with thin clutter (lines, dots). Training images have a moderate aspect and the object near
the middle, so the usual resize-256 / crop-224 training crop holds it;
test images come at many native sizes and aspect ratios (0.5 to 2) with the object anywhere,
which is where evaluating the full image (what SPP allows, sec. 3) and a centre crop differ.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from spp_detect.datasets.toy_shapes import TOY_CLASSES
from spp_detect.errors import UserInputError

__all__ = ["make_toy_cls", "render_cls_image"]

logger = logging.getLogger(__name__)

# Per split: (short side range in pixels, aspect (w / h) range, object size as a fraction of
# the short side, how far from the centre the object may be (fraction of the free room)).
_SPLITS = {
    "train": {"short": (160, 288), "aspect": (0.75, 1.33), "obj": (0.35, 0.65), "spread": 0.35},
    "test": {"short": (112, 400), "aspect": (0.5, 2.0), "obj": (0.25, 0.7), "spread": 1.0},
}


def _polygon(name: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-radius outline of ``name`` as ``[V, 2]`` points (x, y) around the origin."""
    if name == "square":
        t = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "triangle":
        t = np.array([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * math.pi
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "star":
        t = np.arange(10) * math.pi / 5 + math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == "cross":
        a = rng.uniform(0.28, 0.38)  # half width of the arms
        q = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1)]
        q += [(-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]
        return np.array(q, dtype=np.float64)
    raise ValueError(f"no polygon for shape {name!r}")


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> Tuple[int, ...]:
    """A random colour whose mean differs from the background's by at least 70 grey levels."""
    for _ in range(100):
        c = rng.integers(0, 256, 3)
        if abs(float(c.mean()) - float(background.mean())) >= 70:
            break
    return tuple(int(v) for v in c)


def render_cls_image(
    class_name: str, rng: np.random.Generator, split: str = "train", scale: float = 1.0
) -> np.ndarray:
    """One image of ``class_name``: ``np.ndarray[H, W, 3]`` uint8 RGB, its size drawn for
    ``split`` and multiplied by ``scale`` (small images for fast tests)."""
    if class_name not in TOY_CLASSES:
        raise UserInputError(f"unknown toy class {class_name!r}; choose from {TOY_CLASSES}")
    p = _SPLITS[split]
    short = max(8, round(int(rng.integers(p["short"][0], p["short"][1] + 1)) * scale))
    aspect = math.exp(rng.uniform(math.log(p["aspect"][0]), math.log(p["aspect"][1])))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))

    # Background: a linear gradient between two colours, plus pixel noise.
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = rng.uniform(-1, 1, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (t[0] * xx / w + t[1] * yy / h - min(t[0], 0) - min(t[1], 0)) / (abs(t).sum() + 1e-6)
    bg = c0 + (c1 - c0) * ramp[..., None]
    bg += rng.normal(0, rng.uniform(2, 12), bg.shape)
    image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    mean_bg = np.asarray(bg).reshape(-1, 3).mean(0)

    # Object: radius, stretch, rotation and centre.
    radius = 0.5 * short * rng.uniform(*p["obj"])
    stretch = math.exp(rng.uniform(-0.2, 0.2))
    rx, ry = radius * stretch, radius / stretch
    room_x, room_y = max(w / 2 - rx, 0), max(h / 2 - ry, 0)
    cx = w / 2 + rng.uniform(-1, 1) * room_x * p["spread"]
    cy = h / 2 + rng.uniform(-1, 1) * room_y * p["spread"]

    # Clutter first (thin lines and small dots), so the object stays whole on top of it.
    for _ in range(rng.integers(0, 7)):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        ang, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * short
        end = (x0 + length * math.cos(ang), y0 + length * math.sin(ang))
        draw.line([(x0, y0), end], fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=1)
    for _ in range(rng.integers(0, 5)):
        x0, y0, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 0.04 * short + 1)
        draw.ellipse(
            [x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )

    colour = _contrasting_colour(rng, mean_bg)
    if class_name in ("circle", "ring"):
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        if class_name == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.ellipse(box, outline=colour, width=max(2, round(radius * rng.uniform(0.18, 0.3))))
    else:
        pts = _polygon(class_name, rng)
        theta = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        pts = pts @ rot.T * np.array([rx, ry]) + np.array([cx, cy])
        draw.polygon([tuple(v) for v in pts], fill=colour)
    return np.asarray(image)


def make_toy_cls(
    root: Union[str, Path],
    num_train: int = 40,
    num_test: int = 20,
    seed: int = 0,
    classes: Sequence[str] = TOY_CLASSES,
    scale: float = 1.0,
) -> Path:
    """Write the toy set under ``root`` (``train/`` and ``test/``, ``num_*`` images per class).

    Image sides: train 160..288 px on the short side (aspect 0.75..1.33), test 112..400 px
    (aspect 0.5..2), all multiplied by ``scale``.

    Deterministic for a given seed: image ``i`` of class ``c`` in a split draws from its own
    generator, so changing ``num_train`` keeps the first images. Returns ``root``.
    """
    root = Path(root)
    if num_train < 1 or num_test < 1:
        raise UserInputError(f"num_train and num_test must be >= 1, got {num_train}, {num_test}")
    counts: Dict[str, int] = {"train": int(num_train), "test": int(num_test)}
    for split_id, (split, n) in enumerate(counts.items()):
        for class_id, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, class_id, i])
                image = render_cls_image(name, rng, split, scale)
                Image.fromarray(image).save(folder / f"{name}_{i:04d}.png")
    meta = {
        "classes": list(classes),
        "num_train": num_train,
        "num_test": num_test,
        "seed": seed,
        "scale": scale,
    }
    (root / "toy_cls.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "wrote %d classes x (%d train + %d test) images to %s",
        len(classes),
        num_train,
        num_test,
        root,
    )
    return root
