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

The images are drawn by ``datasets/toy_scene.py`` (shapes from ``toy_shapes``, colours and
backgrounds from ``toy_paint``); this module writes them as a VOC folder. The output depends only
on the arguments: the same seed gives byte-identical files.

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

import numpy as np
from PIL import Image

from spp_detect.datasets import toy_styles
from spp_detect.datasets.toy_scene import ToyObject, render_instance_image, render_toy_image
from spp_detect.datasets.toy_shapes import TOY_CLASSES

__all__ = ["DatasetExistsError", "make_toy_voc"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "trainval", "test")

_INSTANCE_STREAM = 0x1257  # instance split: third seed word of each image's random stream


class DatasetExistsError(FileExistsError, ValueError):
    """The output folder already holds a dataset and ``overwrite`` was not given."""


@dataclass(frozen=True)
class _Request:
    """The checked arguments of one ``make_toy_voc`` call."""

    seed: int
    counts: Tuple[int, int, int]  # train, val, test images
    size_range: Tuple[int, int]  # (min, max) side length in pixels
    classes: List[str]
    max_objects: int
    year: str
    jpeg_quality: int
    instance_split: bool


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
    req = _check_arguments(
        classes, (num_train, num_val, num_test), image_size, max_objects, year, jpeg_quality,
        seed, instance_split,
    )  # fmt: skip
    final = root / f"VOC{year}"
    if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
        raise DatasetExistsError(
            f"{final}: a dataset already exists here; pass overwrite=True "
            "(--overwrite) to replace it"
        )

    ids, splits = _assign_splits(num_train, num_val, num_test, seed)
    root.mkdir(parents=True, exist_ok=True)
    stats = _write_dataset(root, final, req, ids, splits)
    logger.info(
        "toy VOC: %d images (%s), %d objects (%d difficult, %d truncated) in %s",
        len(ids),
        ", ".join(f"{s} {len(splits[s])}" for s in ("train", "val", "test")),
        *stats,
        final,
    )
    return root


def _write_dataset(
    root: Path, final: Path, req: _Request, ids: List[str], splits: Dict[str, List[str]]
) -> Tuple[int, int, int]:
    """Write the dataset to ``final`` -> (objects, difficult, truncated) counts."""
    # Build everything in a hidden sibling folder, then rename it into place: an interrupted
    # run never leaves a half-written VOC<year> behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".VOC{req.year}.tmp-", dir=root))
    try:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        present, records, stats = _write_images(tmp, req, ids, splits)
        _write_image_sets(tmp / "ImageSets" / "Main", splits, req.classes, present)
        meta = _metadata(req, records)
        (tmp / "toy_voc.json").write_text(json.dumps(meta, indent=1) + "\n")
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _check_arguments(
    classes: Sequence[str],
    counts: Tuple[int, int, int],
    image_size: Tuple[int, int],
    max_objects: int,
    year: str,
    jpeg_quality: int,
    seed: int,
    instance_split: bool,
) -> _Request:
    """The arguments of ``make_toy_voc`` checked (``ValueError`` naming the bad one)."""
    classes = [str(c) for c in classes]
    unknown = sorted(set(classes) - set(TOY_CLASSES))
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {TOY_CLASSES}, got {classes}")
    num_train, num_val, num_test = counts
    if min(num_train, num_val, num_test) < 0 or num_train + num_val + num_test == 0:
        raise ValueError(
            f"image counts must be >= 0 and not all 0, got {num_train}/{num_val}/{num_test}"
        )
    lo, hi = (int(v) for v in image_size)
    if not 64 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 64 <= min <= max, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    return _Request(
        seed, tuple(counts), (lo, hi), classes, max_objects, year, jpeg_quality, instance_split
    )


def _render_image(
    req: _Request, index: int, first_class: str, side: Optional[toy_styles.StyleSide]
) -> Tuple[np.ndarray, List[ToyObject], Optional[dict]]:
    """Image ``index`` (0-based) -> (uint8 RGB image, its objects, its instance-split record
    or None in the plain mode); ``side`` is None in the plain mode."""
    lo, hi = req.size_range
    if side is None:
        rng = np.random.default_rng([req.seed, index + 1])
    else:  # other draws than the plain set of the same seed
        rng = np.random.default_rng([req.seed, index + 1, _INSTANCE_STREAM])
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    if side is None:
        image, objects, _ = render_toy_image(
            rng, w, h, req.classes, req.max_objects, first_class=first_class
        )
        return image, objects, None
    scene = render_instance_image(
        rng, w, h, side, req.classes, req.max_objects, first_class=first_class
    )
    record = dict(
        side=side.name,
        objects=[_object_record(o) for o in scene.objects],
        distractors=[_object_record(o) for o in scene.distractors],
    )
    return scene.image, scene.objects, record


def _write_images(
    tmp: Path, req: _Request, ids: List[str], splits: Dict[str, List[str]]
) -> Tuple[Dict[str, Dict[str, int]], Dict[str, dict], Tuple[int, int, int]]:
    """Render every image into ``tmp``'s JPEGImages and Annotations -> (per image the devkit
    presence flag of each class in it, instance-split records by image id, (objects,
    difficult, truncated) counts)."""
    first_class = {}
    for split in ("train", "val", "test"):  # cycle through the classes within each split
        for k, image_id in enumerate(splits[split]):
            first_class[image_id] = req.classes[k % len(req.classes)]
    sides = {s: toy_styles.style_side(s, req.classes) for s in ("train", "test")}
    test_ids = set(splits["test"])
    present: Dict[str, Dict[str, int]] = {}
    records: Dict[str, dict] = {}
    n_objects = n_difficult = n_truncated = 0
    for index, image_id in enumerate(ids):
        side = None
        if req.instance_split:
            side = sides["test" if image_id in test_ids else "train"]
        image, objects, record = _render_image(req, index, first_class[image_id], side)
        if record is not None:
            records[image_id] = record
        h, w = image.shape[:2]
        jpeg = _encode_jpeg(image, req.jpeg_quality)
        (tmp / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg)
        (tmp / "Annotations" / f"{image_id}.xml").write_bytes(
            _annotation_xml(image_id, req.year, w, h, objects)
        )
        flags: Dict[str, int] = {}
        for o in objects:  # devkit: 1 = present, 0 = only difficult ones, -1 = absent
            flags[o.name] = max(flags.get(o.name, -1), 0 if o.difficult else 1)
        present[image_id] = flags
        n_objects += len(objects)
        n_difficult += sum(o.difficult for o in objects)
        n_truncated += sum(o.truncated for o in objects)
    return present, records, (n_objects, n_difficult, n_truncated)


def _write_image_sets(
    main: Path,
    splits: Dict[str, List[str]],
    classes: Sequence[str],
    present: Dict[str, Dict[str, int]],
) -> None:
    """``ImageSets/Main``: the split lists and the devkit's per-class lists."""
    for split in SPLITS:
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in splits[split]))
        for c in classes:
            lines = (f"{i} {present[i].get(c, -1):2d}\n" for i in splits[split])
            (main / f"{c}_{split}.txt").write_text("".join(lines))


def _metadata(req: _Request, records: Dict[str, dict]) -> dict:
    """What ``toy_voc.json`` holds: the arguments and, with instance_split, the split."""
    num_train, num_val, num_test = req.counts
    meta = dict(
        generator="spp_detect.datasets.toy_voc",
        seed=req.seed,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        image_size=list(req.size_range),
        classes=req.classes,
        max_objects=req.max_objects,
        jpeg_quality=req.jpeg_quality,
    )
    if req.instance_split:
        meta["instance_split"] = dict(toy_styles.split_record(req.classes), images=records)
    return meta


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
