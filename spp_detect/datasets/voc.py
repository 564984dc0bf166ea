"""Pascal VOC reader: a VOCdevkit folder -> ``list[ImageRecord]``.

Layout (any year, any split; the toy dataset uses the same one)::

    ROOT/                                  # the VOCdevkit folder, passed as ``root``
      VOC2007/
        Annotations/<id>.xml
        JPEGImages/<id>.jpg                # another extension is found if .jpg is missing
        ImageSets/Main/<split>.txt         # one image id per line

This module is THE one place where VOC's 1-based inclusive pixel boxes are converted to the
continuous frame of ``spp_detect.structures.boxes``, with ``structures.voc_pixels``
(``voc_pixels_to_boxes``); ``spp_detect/evaluation/voc.py`` converts back with its inverse when it
writes results files and computes AP.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import UserInputError
from ..structures.voc_pixels import voc_pixels_to_boxes
from .records import ImageRecord

__all__ = [
    "VOC_CLASSES",
    "VOCDataset",
    "available_splits",
    "available_years",
    "parse_voc_xml",
]

logger = logging.getLogger(__name__)

# The 20 Pascal VOC object classes, in the devkit's order (VOCopts.classes).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")

PathLike = Union[str, os.PathLike]


def _layout(year: str, split: str = "<split>") -> str:
    return (
        f"expected ROOT/VOC{year}/{{Annotations/<id>.xml, JPEGImages/<id>.jpg, "
        f"ImageSets/Main/{split}.txt}} with ROOT the VOCdevkit folder"
    )


@dataclass
class VOCAnnotation:
    """One parsed annotation file, boxes still in VOC's 1-based inclusive pixels.

    Attributes:
        filename: the ``<filename>`` element ('' when absent).
        width, height: ``<size>`` in pixels (0 when absent).
        names: object class names, as written.
        boxes_voc (float64 [G, 4]): ``xmin, ymin, xmax, ymax``, 1-based inclusive pixels.
        difficult, truncated (bool [G]): the flags (False when absent).
    """

    filename: str
    width: int
    height: int
    names: List[str]
    boxes_voc: np.ndarray
    difficult: np.ndarray
    truncated: np.ndarray


def _flag(obj: ET.Element, tag: str, path: Path, k: int) -> bool:
    node = obj.find(tag)
    if node is None or node.text is None or not node.text.strip():
        return False  # VOC2007 marks every object; other VOC-format sets often omit the flags
    try:
        return bool(int(float(node.text)))
    except ValueError:
        raise UserInputError(
            f"{path}: object {k}: <{tag}> is not a number: {node.text!r}"
        ) from None


def parse_voc_xml(path: PathLike) -> VOCAnnotation:
    """Parse one VOC annotation file (``Annotations/<id>.xml``) with ``xml.etree``.

    Only the object's own ``<bndbox>`` is read (not those of its ``<part>`` children).

    Raises:
        ValueError: naming the file, if it is missing, not XML, or has a malformed object.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserInputError(f"{path}: malformed XML ({e})") from None
    width = height = 0
    size = root.find("size")
    if size is not None:
        try:
            width = int(float(size.findtext("width", "0")))
            height = int(float(size.findtext("height", "0")))
        except ValueError:
            raise UserInputError(f"{path}: <size> is not numeric") from None
    names, boxes, difficult, truncated = [], [], [], []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise UserInputError(f"{path}: object {k} has no <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise UserInputError(f"{path}: object {k} ({name}) has no <bndbox>")
        try:
            box = [float(bndbox.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise UserInputError(
                f"{path}: object {k} ({name}): <bndbox> needs numeric xmin, ymin, xmax, ymax"
            ) from None
        if not np.all(np.isfinite(box)) or box[2] < box[0] or box[3] < box[1]:
            raise UserInputError(f"{path}: object {k} ({name}): invalid box {box} (xmax < xmin?)")
        names.append(name)
        boxes.append(box)
        difficult.append(_flag(obj, "difficult", path, k))
        truncated.append(_flag(obj, "truncated", path, k))
    return VOCAnnotation(
        filename=(root.findtext("filename") or "").strip(),
        width=width,
        height=height,
        names=names,
        boxes_voc=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        difficult=np.asarray(difficult, dtype=bool),
        truncated=np.asarray(truncated, dtype=bool),
    )


def available_years(root: PathLike) -> List[str]:
    """Years with a ``VOC<year>`` folder under the VOCdevkit folder ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name[3:] for p in root.iterdir() if p.is_dir() and p.name.startswith("VOC"))


def available_splits(root: PathLike, year: str = "2007") -> List[str]:
    """Split names in ``ROOT/VOC<year>/ImageSets/Main`` (per-class files such as
    ``aeroplane_train`` left out)."""
    main = Path(root) / f"VOC{year}" / "ImageSets" / "Main"
    if not main.is_dir():
        return []
    stems = {p.stem for p in main.glob("*.txt")}
    return sorted(s for s in stems if not any(s.endswith("_" + t) for t in stems))


def _read_split(path: Path) -> List[str]:
    ids: List[str] = []
    seen: Dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        # Per-class split files ("<id> 1") carry a label after the id; the id comes first.
        image_id = fields[0]
        if image_id in seen:
            raise UserInputError(
                f"{path}:{lineno}: image id {image_id!r} repeated (first on line {seen[image_id]})"
            )
        seen[image_id] = lineno
        ids.append(image_id)
    if not ids:
        raise UserInputError(f"{path}: split file lists no image ids")
    return ids


class VOCDataset:
    """Annotations of one split of a VOC-format dataset.

    Args:
        root: the VOCdevkit folder holding ``VOC<year>/`` (the ``VOC<year>`` folder itself is
            accepted too).
        year: e.g. "2007" (also picks the AP metric in ``evaluation.voc``).
        split: ``ImageSets/Main/<split>.txt``, e.g. "trainval", "test".
        class_names: label order. None: ``VOC_CLASSES`` if every object name of this split is a
            VOC class, else the sorted set of names found (a model stores the list it was
            trained with and passes it here at test time).
        skip_unknown: drop objects whose name is not in ``class_names`` instead of raising.

    Attributes:
        records (list[ImageRecord]): boxes float32 [G, 4] in the continuous frame, labels int64
            0-based into ``class_names``, ``difficult`` and ``truncated`` flags.
        class_names (list[str]), image_ids (list[str]), root (the VOCdevkit folder), year, split.

    Raises:
        ValueError: naming the folder or file, for a missing folder, split file or annotation,
            a malformed annotation, or an object of an unknown class.
    """

    def __init__(
        self,
        root: PathLike,
        year: Union[str, int] = "2007",
        split: str = "trainval",
        class_names: Optional[Sequence[str]] = None,
        skip_unknown: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        self.year = str(year)
        self.split = str(split)
        if not (root / f"VOC{self.year}").is_dir() and root.name == f"VOC{self.year}":
            root = root.parent  # the VOC<year> folder itself was given
        self.root = root
        if not root.is_dir():
            raise UserInputError(f"{root}: VOC root folder not found; {_layout(self.year, split)}")
        voc_dir = root / f"VOC{self.year}"
        if not voc_dir.is_dir():
            years = available_years(root)
            found = f" (found years: {', '.join(years)})" if years else ""
            raise UserInputError(f"{voc_dir}: folder not found{found}; {_layout(self.year, split)}")
        self.voc_dir = voc_dir
        split_file = voc_dir / "ImageSets" / "Main" / f"{self.split}.txt"
        if not split_file.is_file():
            splits = available_splits(root, self.year)
            found = f" (available splits: {', '.join(splits)})" if splits else ""
            raise UserInputError(f"{split_file}: split file not found{found}")
        self.image_ids = _read_split(split_file)
        anns = [parse_voc_xml(voc_dir / "Annotations" / f"{i}.xml") for i in self.image_ids]

        if class_names is None:
            names = sorted({n for a in anns for n in a.names})
            class_names = VOC_CLASSES if set(names) <= set(VOC_CLASSES) else names
        self.class_names = [str(c) for c in class_names]
        if len(set(self.class_names)) != len(self.class_names):
            raise UserInputError(f"class_names has duplicates: {self.class_names}")
        index = {c: k for k, c in enumerate(self.class_names)}

        images = self._list_images(voc_dir / "JPEGImages")
        self.records: List[ImageRecord] = []
        num_skipped = 0
        for image_id, ann in zip(self.image_ids, anns):
            xml_path = voc_dir / "Annotations" / f"{image_id}.xml"
            keep = np.array([n in index for n in ann.names], dtype=bool)
            if not keep.all():
                if not skip_unknown:
                    bad = sorted({n for n in ann.names if n not in index})
                    raise UserInputError(
                        f"{xml_path}: object class {bad[0]!r} is not one of the "
                        f"{len(self.class_names)} classes ({', '.join(self.class_names[:5])}"
                        f"{', ...' if len(self.class_names) > 5 else ''}); pass "
                        "skip_unknown=True to drop such objects"
                    )
                num_skipped += int((~keep).sum())
            path = self._image_path(voc_dir / "JPEGImages", image_id, ann.filename, images)
            width, height = ann.width, ann.height
            if width <= 0 or height <= 0:
                width, height = self._size_from_image(xml_path, path)
            self.records.append(
                ImageRecord(
                    image_id=image_id,
                    path=path,
                    width=width,
                    height=height,
                    boxes=voc_pixels_to_boxes(ann.boxes_voc[keep]),
                    labels=np.array([index[n] for n, k in zip(ann.names, keep) if k], np.int64),
                    difficult=ann.difficult[keep],
                    truncated=ann.truncated[keep],
                )
            )
        if num_skipped:
            logger.info("%s: skipped %d objects of unknown classes", split_file, num_skipped)
        self._index = {r.image_id: i for i, r in enumerate(self.records)}
        logger.info(
            "VOC%s %s: %d images, %d objects, %d classes",
            self.year, self.split, len(self.records),
            sum(len(r.labels) for r in self.records), len(self.class_names),
        )  # fmt: skip

    @staticmethod
    def _list_images(folder: Path) -> Dict[str, str]:
        """stem -> file name of the images in ``folder`` (one directory listing, not a stat
        per image)."""
        if not folder.is_dir():
            logger.warning("%s: folder not found; image paths will not resolve", folder)
            return {}
        found: Dict[str, str] = {}
        with os.scandir(folder) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext in _IMAGE_EXTENSIONS and (stem not in found or ext == ".jpg"):
                    found[stem] = entry.name
        return found

    @staticmethod
    def _image_path(folder: Path, image_id: str, filename: str, images: Dict[str, str]) -> Path:
        if image_id in images:
            return folder / images[image_id]
        if filename and (folder / filename).is_file():
            return folder / filename
        return folder / f"{image_id}.jpg"  # missing: the image reader will name it

    @staticmethod
    def _size_from_image(xml_path: Path, image_path: Path):
        """(width, height) from the image header when the annotation has no ``<size>``."""
        try:
            from PIL import Image

            with Image.open(image_path) as im:
                return im.size
        except Exception as e:  # noqa: BLE001 - any failure means: no size available
            raise UserInputError(
                f"{xml_path}: no <size> and image {image_path} is unreadable ({e})"
            ) from None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def index(self, image_id: str) -> int:
        """Position of ``image_id`` in ``records``; ValueError if it is not in this split."""
        try:
            return self._index[image_id]
        except KeyError:
            msg = f"image id {image_id!r} is not in VOC{self.year} {self.split}"
            raise ValueError(msg) from None

    def __repr__(self) -> str:
        return (
            f"VOCDataset(root={str(self.root)!r}, year={self.year!r}, split={self.split!r}, "
            f"images={len(self)}, classes={len(self.class_names)})"
        )
