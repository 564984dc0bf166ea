"""One image of the toy VOC set: shapes placed, painted and annotated on a cluttered background.

Occlusion between objects is limited: every object keeps at least 70% of its pixels, pairs of
boxes overlap by IoU <= 0.3, and no box lies more than half inside another. Each object's box is
the exact bounding box of its visible pixels (its mask), in the continuous frame.
``render_toy_image`` draws the plain mode; ``render_instance_image`` the instance-split mode
(styles, textures and distractors from ``datasets/toy_styles.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from spp_detect.datasets import toy_paint, toy_styles, toy_textures
from spp_detect.datasets.toy_style_shapes import ShapeStyle
from spp_detect.datasets.toy_shapes import (
    TOY_CLASSES,
    max_rotation,
    place,
    plain_aspect,
    plain_layers,
)

__all__ = ["ToyObject", "ToyScene", "render_toy_image", "render_instance_image"]

_MAX_TRIES = 30  # placement attempts per object before giving up on it
_MIN_VISIBLE = 0.7  # every object keeps at least this fraction of its pixels
_MAX_IOU = 0.3  # boxes of two objects in one image overlap at most this much,
_MAX_INSIDE = 0.5  # and neither box lies more than half inside the other
_MIN_EASY_SIDE = 20  # px; R-CNN's selective search drops boxes narrower than 20 px
_LOW_CONTRAST_P = 0.06  # chance that an object nearly takes the background's colour (difficult)
_SENSOR_NOISE = 2.0  # std of the pixel noise added to the finished image (grey levels)
_MAX_DISTRACTORS = 2  # instance split: 0..2 unannotated shapes of no class per image


@dataclass(frozen=True)
class ToyObject:
    """One object of a generated image.

    Attributes:
        name: class name.
        box: ``(x1, y1, x2, y2)`` ints, continuous frame: the object's visible pixels are
            columns ``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1``.
        difficult: tiny or low-contrast (VOC evaluation ignores it).
        truncated: part of the shape lies outside the image.
        style: instance-split mode only: the shape style (``"circle/ellipse"``,
            ``"distractor/heart"``); ``None`` in the plain mode.
        texture: instance-split mode only: the texture family (``"dots/pastel"``).
    """

    name: str
    box: Tuple[int, int, int, int]
    difficult: bool
    truncated: bool
    style: Optional[str] = None
    texture: Optional[str] = None


@dataclass
class ToyScene:
    """One image of the instance-split mode.

    Attributes:
        image: uint8 [H, W, 3] RGB.
        objects: the annotated objects (``style`` and ``texture`` set).
        masks: bool [H, W] per object, its visible pixels (``objects[i].box`` is their box).
        distractors: the shapes of no class (``name`` is the distractor kind, never a class);
            not annotated.
        distractor_masks: bool [H, W] per distractor, its visible pixels.
    """

    image: np.ndarray
    objects: List[ToyObject]
    masks: List[np.ndarray]
    distractors: List[ToyObject]
    distractor_masks: List[np.ndarray]


def _overlaps(a: Tuple[int, ...], b: Tuple[int, ...]) -> Tuple[float, float]:
    """(IoU, intersection over the smaller box) of two xyxy boxes."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    union = area_a + area_b - inter
    return (inter / union if union > 0 else 0.0), inter / max(min(area_a, area_b), 1)


def _too_close(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    iou, inside = _overlaps(a, b)
    return iou > _MAX_IOU or inside > _MAX_INSIDE


def _mask_box(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    if ys.size == 0:
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _fit(
    rng: np.random.Generator,
    width: int,
    height: int,
    item: dict,
    side: Optional[toy_styles.StyleSide],
    placed: List[dict],
) -> Optional[Tuple[np.ndarray, np.ndarray, Tuple[int, int, int, int], bool, bool]]:
    """Up to ``_MAX_TRIES`` placements of ``item``'s shape -> ``(labels, mask, box, truncated,
    small)`` of the first that keeps clear of the ``placed`` objects; None if none does."""
    name, style = item["name"], item.get("style")
    if style is None:
        shape, max_rot, draw_aspect = plain_layers(name), max_rotation(name), plain_aspect
    else:
        shape, max_rot, draw_aspect = style.layers, style.max_rotation, side.draw_aspect
    for _ in range(_MAX_TRIES):
        labels, truncated, small = place(rng, width, height, shape, max_rot, draw_aspect)
        full = labels > 0
        box = _mask_box(full)
        if box is None or min(box[2] - box[0], box[3] - box[1]) < 6:
            continue
        if any(_too_close(box, p["box"]) for p in placed):
            continue
        if any((p["mask"] & ~full).sum() < _MIN_VISIBLE * p["area"] for p in placed):
            continue
        return labels, full, box, truncated, small
    return None


def _paint(
    rng: np.random.Generator,
    img: np.ndarray,
    labels: np.ndarray,
    full: np.ndarray,
    box: Tuple[int, int, int, int],
    small: bool,
    style: Optional[ShapeStyle],
    side: Optional[toy_styles.StyleSide],
) -> Tuple[Optional[str], bool]:
    """Paint one placed shape (label map ``labels``, mask ``full``) into ``img`` in place ->
    (texture family or None in the plain mode, low contrast)."""
    x0, y0, x1, y1 = box
    texture = None
    if side is None:
        tex = toy_paint.texture(rng, y1 - y0, x1 - x0)
    else:
        texture = side.pick_texture(rng)
        tex = toy_textures.paint_fill(rng, texture, labels[y0:y1, x0:x1])
    low_contrast = not small and rng.random() < _LOW_CONTRAST_P
    if low_contrast:  # nearly the local background colour: hard even for people
        bg_mean = img[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        tex = 0.85 * bg_mean + 0.15 * tex
    region = img[y0:y1, x0:x1]
    m = full[y0:y1, x0:x1]
    if style is not None and style.soft_edge:  # fade into what lies below (mask unchanged)
        alpha = toy_textures.edge_fade(m)[..., None]
        tex = region + (tex - region) * alpha
    region[m] = tex[m]
    return texture, low_contrast


def _compose(
    rng: np.random.Generator,
    width: int,
    height: int,
    items: List[dict],
    img: np.ndarray,
    side: Optional[toy_styles.StyleSide],
) -> Tuple[np.ndarray, List[dict]]:
    """Place and paint ``items`` (dicts with ``name``, and ``style`` in the instance-split mode)
    on ``img`` in order, each on top of the earlier ones -> (uint8 image, placed items with
    their final visible ``mask`` and ``box``)."""
    placed: List[dict] = []
    for item in items:
        fitted = _fit(rng, width, height, item, side, placed)
        if fitted is None:
            continue  # no room for this one
        labels, full, box, truncated, small = fitted
        for p in placed:  # the new object is drawn on top
            p["mask"] = p["mask"] & ~full
            p["box"] = _mask_box(p["mask"])
        texture, low_contrast = _paint(rng, img, labels, full, box, small, item.get("style"), side)
        placed.append(
            dict(
                item,
                mask=full,
                area=int(full.sum()),
                box=box,
                truncated=truncated,
                small=small,
                low=low_contrast,
                texture=texture,
            )
        )
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(_SENSOR_NOISE)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), placed


def _toy_object(p: dict) -> ToyObject:
    bx = p["box"]
    tiny = min(bx[2] - bx[0], bx[3] - bx[1]) < _MIN_EASY_SIDE
    style = p.get("style")
    return ToyObject(
        p["name"],
        tuple(bx),
        bool(p["small"] or p["low"] or tiny),
        bool(p["truncated"]),
        None if style is None else style.name,
        p["texture"],
    )


def _class_names(
    rng: np.random.Generator, classes: Sequence[str], max_objects: int, first_class: Optional[str]
) -> List[str]:
    n = int(rng.integers(1, max_objects + 1))
    names = [str(rng.choice(list(classes))) for _ in range(n)]
    if first_class is not None:
        names[0] = first_class
    return names


def render_toy_image(
    rng: np.random.Generator,
    width: int,
    height: int,
    classes: Sequence[str] = TOY_CLASSES,
    max_objects: int = 4,
    first_class: Optional[str] = None,
) -> Tuple[np.ndarray, List[ToyObject], List[np.ndarray]]:
    """Render one image of the plain mode.

    Args:
        rng: the only source of randomness.
        width, height: image size in pixels.
        classes: class names to draw from (each must be one of :data:`TOY_CLASSES`).
        max_objects: objects per image are drawn uniformly from 1..max_objects.
        first_class: class of the first object (the generator uses it to cover every class in
            every split); ``None``: random.
    Returns:
        image: np.ndarray[height, width, 3] uint8 RGB.
        objects: one :class:`ToyObject` per visible object (at least one).
        masks: bool [height, width] per object, its visible pixels; ``objects[i].box`` is the
            exact bounding box of ``masks[i]``.
    """
    img = toy_paint.background(rng, height, width)
    names = _class_names(rng, classes, max_objects, first_class)
    image, placed = _compose(rng, width, height, [dict(name=n) for n in names], img, None)
    return image, [_toy_object(p) for p in placed], [p["mask"] for p in placed]


def render_instance_image(
    rng: np.random.Generator,
    width: int,
    height: int,
    side: toy_styles.StyleSide,
    classes: Sequence[str] = TOY_CLASSES,
    max_objects: int = 4,
    first_class: Optional[str] = None,
) -> ToyScene:
    """Render one image of the instance-split mode.

    As :func:`render_toy_image`, but each object's shape style, texture family and aspect ratio
    come from ``side`` (``toy_styles.style_side("train" | "test", classes)``), and 0 to
    ``_MAX_DISTRACTORS`` shapes of no class are painted among the objects (the first object
    is placed first; the others and the distractors in random order).
    """
    img = toy_paint.background(rng, height, width)
    names = _class_names(rng, classes, max_objects, first_class)
    items = [dict(name=n, style=side.pick_style(rng, n), annotated=True) for n in names]
    for _ in range(int(rng.integers(0, _MAX_DISTRACTORS + 1))):
        style = side.pick_distractor(rng)
        items.append(dict(name=style.name.split("/")[1], style=style, annotated=False))
    rest = items[1:]
    items = items[:1] + [rest[i] for i in rng.permutation(len(rest))]
    image, placed = _compose(rng, width, height, items, img, side)
    objs = [p for p in placed if p["annotated"]]
    distractors = [p for p in placed if not p["annotated"]]
    return ToyScene(
        image,
        [_toy_object(p) for p in objs],
        [p["mask"] for p in objs],
        [_toy_object(p) for p in distractors],
        [p["mask"] for p in distractors],
    )
