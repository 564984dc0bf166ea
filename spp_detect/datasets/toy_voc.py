"""A small synthetic detection dataset in Pascal VOC format, for tests, CI and the demo.

Each image has 1-4 shapes ("circle", "square", "triangle", "star", "cross", "ring") of varied
scale, aspect ratio, rotation, colour and texture (solid, stripes, noise, gradient, checker) on a
cluttered background (smooth colour fields, pixel noise, thin lines, soft irregular blobs). Colour
and texture are drawn independently of the class, so only the shape tells the classes apart.
Some objects are ``difficult`` (tiny, or nearly the background's colour) and some ``truncated``
by the image border; occlusion between objects is limited (every object keeps at least 70% of
its pixels, pairs of boxes overlap by IoU <= 0.3, and no box lies more than half inside
another).

Ground-truth boxes are the exact bounding boxes of each object's visible pixels (the masks used
to paint them), written in VOC's 1-based inclusive pixels: a box that covers pixels
``x1 .. x2 - 1`` in spp_detect's continuous frame is written ``xmin = x1 + 1, xmax = x2`` (and the
VOC reader, ``datasets/voc.py``, converts back with ``x1 = xmin - 1, x2 = xmax``).

The output depends only on the arguments: the same seed gives byte-identical files.

``instance_split=True`` measures detection on objects the detector has not seen: test images
draw their objects from other shape styles, textures and proportions than training images, and
unannotated distractor shapes of no class appear in every split (see ``datasets/toy_styles.py``).
``toy_voc.json`` then records the split and every object's style.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from spp_detect.datasets import toy_styles

__all__ = [
    "TOY_CLASSES",
    "ToyObject",
    "ToyScene",
    "DatasetExistsError",
    "render_toy_image",
    "render_instance_image",
    "make_toy_voc",
]

logger = logging.getLogger(__name__)

TOY_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
SPLITS = ("train", "val", "trainval", "test")

_SUB = 4  # cv2.fillPoly fractional bits: vertices at 1/16 pixel
_MAX_TRIES = 30  # placement attempts per object before giving up on it
_MIN_VISIBLE = 0.7  # every object keeps at least this fraction of its pixels
_MAX_IOU = 0.3  # boxes of two objects in one image overlap at most this much,
_MAX_INSIDE = 0.5  # and neither box lies more than half inside the other
_SMALL_EXTENT = (10, 18)  # px, size range of the deliberately tiny (difficult) objects
_MIN_EASY_SIDE = 20  # px; R-CNN's selective search drops boxes narrower than 20 px
_SMALL_P = 0.12  # chance that an object is tiny (difficult)
_LOW_CONTRAST_P = 0.06  # chance that an object nearly takes the background's colour (difficult)
_TRUNCATED_P = 0.15  # chance that an object is centred near the border (usually truncated)
_SENSOR_NOISE = 2.0  # std of the pixel noise added to the finished image (grey levels)
_MAX_DISTRACTORS = 2  # instance split: 0..2 unannotated shapes of no class per image
_INSTANCE_STREAM = 0x1257  # instance split: third seed word of each image's random stream


class DatasetExistsError(FileExistsError, ValueError):
    """The output folder already holds a dataset and ``overwrite`` was not given."""


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


def _max_rotation(name: str) -> float:
    # Squares and crosses stay roughly axis-aligned (a 45-degree square reads as a diamond).
    return {"square": 15.0, "cross": 20.0, "circle": 90.0, "ring": 90.0}.get(name, 180.0)


def _rasterize(layers: List[Tuple[np.ndarray, int]]) -> Tuple[np.ndarray, int, int]:
    """Fill ``(contour, value)`` layers (image-frame float vertices) in order ->
    (uint8 label map, x0, y0) of their bounding box; label 0 is outside the shape."""
    allpts = np.concatenate([c for c, _ in layers])
    x0, y0 = np.floor(allpts.min(0)).astype(int) - 1
    x1, y1 = np.ceil(allpts.max(0)).astype(int) + 2
    labels = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    for c, value in layers:
        pts = np.round((c - [x0, y0]) * (1 << _SUB)).astype(np.int32)
        cv2.fillPoly(labels, [pts], int(value), cv2.LINE_8, _SUB)
    return labels, int(x0), int(y0)


# --------------------------------------------------------------------------------------------
# colours and textures


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    px = np.uint8([[[round(h * 179) % 180, round(s * 255), round(v * 255)]]])
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _vivid(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))


def _muted(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.25, 0.85))


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
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


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
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
            [np.round((pts - [x0, y0]) * (1 << _SUB)).astype(np.int32)],
            255,
            cv2.LINE_8,
            _SUB,
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


# --------------------------------------------------------------------------------------------
# one image


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


def _plain_aspect(rng: np.random.Generator) -> float:
    return float(np.exp(rng.uniform(np.log(0.67), np.log(1.5))))


def _plain_layers(name: str):
    """The plain mode's shape of a class as layers: the first contour filled, the rest holes."""
    return lambda rng: [(c, 1 if i == 0 else 0) for i, c in enumerate(_unit_shape(name, rng))]


def _place(
    rng: np.random.Generator,
    w: int,
    h: int,
    layers,
    max_rotation: float,
    draw_aspect=_plain_aspect,
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
    local, x0, y0 = _rasterize([((c * [sx, sy]) @ rmat.T + [cx, cy], v) for c, v in layers(rng)])
    full = np.zeros((h, w), dtype=np.uint8)
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + local.shape[1], w), min(y0 + local.shape[0], h)
    if ix1 > ix0 and iy1 > iy0:
        full[iy0:iy1, ix0:ix1] = local[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    truncated = int(np.count_nonzero(full)) < int(np.count_nonzero(local))
    return full, truncated, small


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
        name, style = item["name"], item.get("style")
        if style is None:
            shape, max_rot, draw_aspect = _plain_layers(name), _max_rotation(name), _plain_aspect
        else:
            shape, max_rot, draw_aspect = style.layers, style.max_rotation, side.draw_aspect
        for _ in range(_MAX_TRIES):
            labels, truncated, small = _place(rng, width, height, shape, max_rot, draw_aspect)
            full = labels > 0
            box = _mask_box(full)
            if box is None or min(box[2] - box[0], box[3] - box[1]) < 6:
                continue
            if any(_too_close(box, p["box"]) for p in placed):
                continue
            if any((p["mask"] & ~full).sum() < _MIN_VISIBLE * p["area"] for p in placed):
                continue
            break
        else:
            continue  # no room for this one
        for p in placed:  # the new object is drawn on top
            p["mask"] = p["mask"] & ~full
            p["box"] = _mask_box(p["mask"])
        x0, y0, x1, y1 = box
        texture = None
        if side is None:
            tex = _texture(rng, y1 - y0, x1 - x0)
        else:
            texture = side.pick_texture(rng)
            tex = toy_styles.paint_fill(rng, texture, labels[y0:y1, x0:x1])
        low_contrast = not small and rng.random() < _LOW_CONTRAST_P
        if low_contrast:  # nearly the local background colour: hard even for people
            bg_mean = img[y0:y1, x0:x1].reshape(-1, 3).mean(0)
            tex = 0.85 * bg_mean + 0.15 * tex
        region = img[y0:y1, x0:x1]
        m = full[y0:y1, x0:x1]
        if style is not None and style.soft_edge:  # fade into what lies below (mask unchanged)
            alpha = toy_styles.edge_fade(m)[..., None]
            tex = region + (tex - region) * alpha
        region[m] = tex[m]
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
    img = _background(rng, height, width)
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
    img = _background(rng, height, width)
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


# --------------------------------------------------------------------------------------------
# the VOC folder


def _annotation_xml(image_id: str, year: str, w: int, h: int, objects: List[ToyObject]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{year}"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "spp_detect toy VOC (synthetic)"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = o.name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o.truncated))
        ET.SubElement(obj, "difficult").text = str(int(o.difficult))
        bb = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = o.box
        # Continuous [x1, x2) -> VOC 1-based inclusive pixels (inverse in datasets/voc.py).
        for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, tag).text = str(int(v))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _assign_splits(
    n_train: int, n_val: int, n_test: int, seed: int
) -> Tuple[List[str], Dict[str, List[str]]]:
    n = n_train + n_val + n_test
    ids = [f"{i:06d}" for i in range(1, n + 1)]
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    shuffled = [ids[i] for i in perm]
    splits = {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }
    splits["trainval"] = sorted(splits["train"] + splits["val"])
    return ids, splits


def make_toy_voc(
    root: Union[str, os.PathLike],
    num_train: int = 60,
    num_val: int = 20,
    num_test: int = 40,
    seed: int = 0,
    image_size: Tuple[int, int] = (200, 400),
    classes: Sequence[str] = TOY_CLASSES,
    max_objects: int = 4,
    year: str = "2007",
    jpeg_quality: int = 92,
    overwrite: bool = False,
    instance_split: bool = False,
) -> Path:
    """Write a VOCdevkit-style toy dataset.

    Layout (what ``datasets.voc.VOCDataset(root, year)`` reads)::

        root/VOC<year>/JPEGImages/<id>.jpg
        root/VOC<year>/Annotations/<id>.xml          VOC XML, boxes 1-based inclusive
        root/VOC<year>/ImageSets/Main/{train,val,trainval,test}.txt
        root/VOC<year>/ImageSets/Main/<class>_<split>.txt   "<id> 1|0|-1" as in the devkit
        root/VOC<year>/toy_voc.json                  the arguments, for the record (and, with
                                                     instance_split, the split of styles and
                                                     every object's style)

    Args:
        root: the VOCdevkit folder (created if needed).
        num_train, num_val, num_test: images per split (ids ``000001``...; splits drawn at
            random, disjoint; ``trainval = train + val``). Each split of at least
            ``len(classes)`` images holds every class.
        seed: everything depends only on it (byte-identical output for the same arguments).
        image_size: ``(min, max)`` side length in pixels; width and height drawn independently.
        classes: a subset of :data:`TOY_CLASSES`.
        max_objects: 1..max_objects objects per image.
        year: the ``VOC<year>`` folder name.
        jpeg_quality: JPEG quality of the images.
        overwrite: replace an existing non-empty ``VOC<year>`` folder.
        instance_split: test images show other instances of the classes than train / val /
            trainval images (other shape styles, textures, colours and proportions, see
            ``datasets/toy_styles.py``), and every image may hold unannotated distractor shapes
            of no class. ``toy_voc.json`` gets an ``instance_split`` entry: the styles, textures
            and aspect ranges of each side, and per image its side, its objects (in annotation
            order: name, style, texture, box) and its distractors. False: the plain set,
            unchanged.
    Returns:
        ``Path(root)``.
    Raises:
        DatasetExistsError: ``root/VOC<year>`` exists, is not empty, and ``overwrite`` is False.
        ValueError: bad counts, sizes or class names.
    """
    root = Path(root)
    classes = [str(c) for c in classes]
    unknown = sorted(set(classes) - set(TOY_CLASSES))
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {TOY_CLASSES}, got {classes}")
    if min(num_train, num_val, num_test) < 0 or num_train + num_val + num_test == 0:
        raise ValueError(
            f"image counts must be >= 0 and not all 0, got {num_train}/{num_val}/{num_test}"
        )
    lo, hi = (int(v) for v in image_size)
    if not 64 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 64 <= min <= max, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    final = root / f"VOC{year}"
    if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
        raise DatasetExistsError(
            f"{final}: a dataset already exists here; pass overwrite=True "
            "(--overwrite) to replace it"
        )

    ids, splits = _assign_splits(num_train, num_val, num_test, seed)
    first_class = {}
    for split in ("train", "val", "test"):  # cycle through the classes within each split
        for k, image_id in enumerate(splits[split]):
            first_class[image_id] = classes[k % len(classes)]

    root.mkdir(parents=True, exist_ok=True)
    # Build everything in a hidden sibling folder, then rename it into place: an interrupted
    # run never leaves a half-written VOC<year> behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".VOC{year}.tmp-", dir=root))
    try:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        present: Dict[str, Dict[str, int]] = {}
        n_objects = n_difficult = n_truncated = 0
        sides = {s: toy_styles.style_side(s, classes) for s in ("train", "test")}
        test_ids = set(splits["test"])
        records: Dict[str, dict] = {}
        for index, image_id in enumerate(ids):
            if not instance_split:
                rng = np.random.default_rng([seed, index + 1])
            else:  # other draws than the plain set of the same seed
                rng = np.random.default_rng([seed, index + 1, _INSTANCE_STREAM])
            w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
            if not instance_split:
                image, objects, _ = render_toy_image(
                    rng, w, h, classes, max_objects, first_class=first_class[image_id]
                )
            else:
                side = sides["test" if image_id in test_ids else "train"]
                scene = render_instance_image(
                    rng, w, h, side, classes, max_objects, first_class=first_class[image_id]
                )
                image, objects = scene.image, scene.objects
                records[image_id] = dict(
                    side=side.name,
                    objects=[_object_record(o) for o in objects],
                    distractors=[_object_record(o) for o in scene.distractors],
                )
            (tmp / "JPEGImages" / f"{image_id}.jpg").write_bytes(_encode_jpeg(image, jpeg_quality))
            (tmp / "Annotations" / f"{image_id}.xml").write_bytes(
                _annotation_xml(image_id, year, w, h, objects)
            )
            flags: Dict[str, int] = {}
            for o in objects:  # devkit: 1 = present, 0 = only difficult ones, -1 = absent
                flags[o.name] = max(flags.get(o.name, -1), 0 if o.difficult else 1)
            present[image_id] = flags
            n_objects += len(objects)
            n_difficult += sum(o.difficult for o in objects)
            n_truncated += sum(o.truncated for o in objects)
        main = tmp / "ImageSets" / "Main"
        for split in SPLITS:
            (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in splits[split]))
            for c in classes:
                lines = (f"{i} {present[i].get(c, -1):2d}\n" for i in splits[split])
                (main / f"{c}_{split}.txt").write_text("".join(lines))
        meta = dict(
            generator="spp_detect.datasets.toy_voc",
            seed=seed,
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            image_size=[lo, hi],
            classes=classes,
            max_objects=max_objects,
            jpeg_quality=jpeg_quality,
        )
        if instance_split:
            meta["instance_split"] = dict(toy_styles.split_record(classes), images=records)
        (tmp / "toy_voc.json").write_text(json.dumps(meta, indent=1) + "\n")
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "toy VOC: %d images (%s), %d objects (%d difficult, %d truncated) in %s",
        len(ids),
        ", ".join(f"{s} {len(splits[s])}" for s in ("train", "val", "test")),
        n_objects,
        n_difficult,
        n_truncated,
        final,
    )
    return root


def _object_record(o: ToyObject) -> dict:
    """An object of the instance-split mode as JSON: box in the continuous frame, xyxy."""
    return dict(name=o.name, style=o.style, texture=o.texture, box=list(o.box))


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an existing ``dst``."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if dst.is_dir():
            dst.rmdir()
        os.replace(src, dst)
