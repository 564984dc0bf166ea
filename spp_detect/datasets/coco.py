"""COCO-format reader: an instances JSON plus an image folder -> ``list[ImageRecord]``.

The same two inputs as detectron2's ``register_coco_instances(name, {}, json_file, image_root)``
and torchvision's ``CocoDetection(root, annFile)``::

    instances.json   {"images": [{"id", "file_name", "width", "height"}, ...],
                      "annotations": [{"id", "image_id", "category_id", "bbox", "iscrowd"}, ...],
                      "categories": [{"id", "name"}, ...]}
    IMAGES/<file_name>

``COCODataset`` offers the interface of ``datasets.voc.VOCDataset`` that training, testing and
evaluation use (``records``, ``class_names``, ``image_ids``, ``root``, ``year``, ``split``,
``len``, ``index``), so either can be passed wherever a dataset is expected.

Conventions:

- Boxes: COCO ``bbox`` is ``[x, y, w, h]`` in pixels of a continuous frame, the frame of
  ``spp_detect.structures.boxes``: ``xyxy = [x, y, x + w, y + h]``, no ``+1`` (VOC's 1-based
  pixels are converted only in ``datasets/voc.py``; ``datasets/convert.py`` writes them back).
- Labels: category ids, sorted, map to contiguous 0-based labels (``category_ids[label]`` is the
  COCO id back, as detectron2's ``thing_dataset_id_to_contiguous_id``).
- Image ids: ``ImageRecord.image_id`` is the image's ``file_name`` without its extension (a VOC
  id, so VOC results files and the proposal cache work unchanged); ``coco_image_ids[i]`` is the
  COCO ``id`` of ``records[i]``.
- ``iscrowd = 1``: kept with ``crowd = True`` and ``difficult = True`` (VOC AP ignores it like a
  difficult object; pycocotools treats it as a crowd region); never a training target.
- ``difficult`` / ``truncated``: optional 0/1 annotation fields (not in COCO itself) that
  ``datasets/convert.py`` writes so that a VOC set converted to COCO and back is unchanged.

Bad input: a structural fault (malformed JSON, a missing key, an annotation whose image or
category does not exist, a repeated id) raises ``UserInputError`` naming the file and the
annotation. A fault the rest can go on without (a box with non-positive width or height or
outside its image, a missing or unreadable image) is logged, skipped and counted in
``skipped``; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import UserInputError
from .coco_json import (
    ann_name,
    group_annotations,
    is_int,
    load_json,
    parse_categories,
    parse_images,
    split_name,
)
from .records import ImageRecord

__all__ = ["COCODataset", "SKIP_REASONS"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Boxes may poke out of their image by this many pixels (annotation tools round the corners
# outwards; COCO train2017 has such boxes) and are clipped to it; further out they are skipped.
BOX_BOUNDS_TOLERANCE = 1.0

# Individual warnings per skip reason; past this, only the summary line counts them.
_MAX_WARNINGS = 10

# Keys of ``COCODataset.skipped`` (always all present, 0 when nothing was skipped).
SKIP_REASONS = (
    "bad_box",  # annotations: non-positive width/height, or outside the image
    "missing_image",  # images: no file at IMAGES/<file_name>
    "unreadable_image",  # images: no width/height in the JSON and the file cannot be read
    "annotations_of_skipped_images",  # annotations dropped with a missing/unreadable image
)


class COCODataset:
    """Annotations of one COCO-format instances file.

    Args:
        json_path: the instances JSON (``annotations/instances_<split>.json``).
        images_dir: the folder that ``file_name`` is relative to.
        class_names: label order. None: the category names in sorted-id order. Given (a model's
            classes at test time): every category of the file must be one of them and each of
            them a category of the file.
        year: the VOC year whose AP rules ``evaluation.voc`` applies; "2007" (11-point AP), so
            that runs on a VOC set and on its COCO conversion compare directly.
        split: the split name of the VOC results files (default: the JSON name without the
            ``instances_`` prefix).
        check_images: open every image header (slow at COCO size) to skip unreadable files;
            without it only the file's existence is checked, and the image header is read only
            when the JSON gives no width/height.

    Attributes:
        records (list[ImageRecord]): one per kept image, in the JSON's image order; boxes
            float32 [G, 4] xyxy in the continuous pixel frame, labels int64 0-based into
            ``class_names``, ``crowd``, ``difficult`` (crowd or the optional ``difficult``
            field), ``truncated``.
        class_names (list[str]); category_ids (list[int]): COCO id of each label;
        image_ids (list[str]): ``records[i].image_id``; coco_image_ids (list): the COCO ids;
        root (the images folder), json_path, year, split;
        skipped (dict[str, int]): counts per reason of ``SKIP_REASONS``.

    Raises:
        UserInputError: one line naming the file (and the annotation or image id) for a missing
            or malformed file, a missing key, an unknown image or category id, a repeated id,
            a malformed ``bbox``, or categories that do not match ``class_names``.
    """

    def __init__(
        self,
        json_path: PathLike,
        images_dir: PathLike,
        class_names: Optional[Sequence[str]] = None,
        year: Union[str, int] = "2007",
        split: Optional[str] = None,
        check_images: bool = False,
    ) -> None:
        self.json_path = Path(json_path).expanduser()
        self.root = Path(images_dir).expanduser()
        self.year = str(year)
        self.split = str(split) if split is not None else split_name(self.json_path)
        if not self.root.is_dir():
            raise UserInputError(f"{self.root}: image folder not found (for {self.json_path})")
        data = load_json(self.json_path)

        self.category_ids, self.class_names = parse_categories(
            self.json_path, data["categories"], class_names
        )
        label_of = {c: k for k, c in enumerate(self.category_ids)}
        self.skipped: Dict[str, int] = {reason: 0 for reason in SKIP_REASONS}
        self._warned: Dict[str, int] = {}

        images = parse_images(self.json_path, data["images"])
        by_image = group_annotations(self.json_path, data["annotations"], images, label_of)

        listing = self._list_folder(self.root)
        self.records: List[ImageRecord] = []
        self.coco_image_ids: List[Any] = []
        for coco_id, image in images.items():
            anns = by_image[coco_id]
            path = self.root / image["file_name"]
            size = self._image_size(image, path, listing, check_images)
            if size is None:
                self.skipped["annotations_of_skipped_images"] += len(anns)
                continue
            self.records.append(self._record(image, path, size, anns, label_of))
            self.coco_image_ids.append(coco_id)
        self.image_ids = [r.image_id for r in self.records]
        self._index = {r.image_id: i for i, r in enumerate(self.records)}
        if any(self.skipped.values()):
            logger.warning(
                "%s: skipped %s",
                self.json_path,
                ", ".join(f"{n} ({reason})" for reason, n in self.skipped.items() if n),
            )
        logger.info(
            "COCO %s: %d images, %d objects (%d crowd), %d classes",
            self.split, len(self.records), sum(len(r.labels) for r in self.records),
            sum(int(r.crowd.sum()) for r in self.records), len(self.class_names),
        )  # fmt: skip

    # -- reading images and boxes ------------------------------------------------------------

    @staticmethod
    def _list_folder(folder: Path) -> set:
        """File names in ``folder`` (one listing instead of a stat per image)."""
        with os.scandir(folder) as it:
            return {entry.name for entry in it}

    def _skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        n = self._warned[reason] = self._warned.get(reason, 0) + 1
        if n <= _MAX_WARNINGS:
            more = " (further ones are only counted)" if n == _MAX_WARNINGS else ""
            logger.warning("%s: %s; skipped%s", self.json_path, message, more)

    def _image_size(
        self, image: Dict[str, Any], path: Path, listing: set, check: bool
    ) -> Optional[Tuple[int, int]]:
        """(width, height), or None (counted) for a missing or unreadable image."""
        file_name = image["file_name"]
        exists = file_name in listing if "/" not in file_name else path.is_file()
        if not exists:
            self._skip("missing_image", f"image id {image['id']!r}: {path} not found")
            return None
        width, height = image.get("width"), image.get("height")
        given = is_int(width) and is_int(height) and width > 0 and height > 0
        if given and not check:
            return int(width), int(height)
        try:
            from PIL import Image

            with Image.open(path) as im:
                size = im.size
        except Exception as e:  # noqa: BLE001 - any failure means: the image cannot be read
            self._skip("unreadable_image", f"image id {image['id']!r}: {path} unreadable ({e})")
            return None
        if given and size != (width, height):
            logger.warning(
                "%s: image id %r: the JSON gives %dx%d, the file %s is %dx%d; using the file's",
                self.json_path, image["id"], width, height, path, *size,
            )  # fmt: skip
        return size

    def _box(self, ann: Dict[str, Any], name: str, image_id: Any, size: Tuple[int, int]):
        """xyxy (continuous frame) of ``ann``, or None (counted) for a bad box."""
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        ):
            raise UserInputError(
                f"{self.json_path}: {name} (image id {image_id!r}): 'bbox' must be 4 numbers "
                f"[x, y, w, h], got {bbox!r}"
            )
        x, y, w, h = (float(v) for v in bbox)
        width, height = size
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            self._skip("bad_box", f"{name} (image id {image_id!r}): bbox {bbox} has no area")
            return None
        # COCO xywh -> continuous xyxy: x2 = x + w, no +1 (the pixel frame of structures.boxes).
        x1, y1, x2, y2 = x, y, x + w, y + h
        tol = BOX_BOUNDS_TOLERANCE
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            self._skip(
                "bad_box",
                f"{name} (image id {image_id!r}): bbox {bbox} is outside its "
                f"{width}x{height} image",
            )
            return None
        x1, y1 = max(x1, 0.0), max(y1, 0.0)
        x2, y2 = min(x2, float(width)), min(y2, float(height))
        if x2 <= x1 or y2 <= y1:  # a sliver along an edge, empty once clipped
            self._skip("bad_box", f"{name} (image id {image_id!r}): bbox {bbox} on the edge")
            return None
        return [x1, y1, x2, y2]

    def _record(
        self,
        image: Dict[str, Any],
        path: Path,
        size: Tuple[int, int],
        anns: List[Tuple[int, Dict[str, Any]]],
        label_of: Dict[int, int],
    ) -> ImageRecord:
        boxes, labels, crowd, difficult, truncated = [], [], [], [], []
        for k, ann in anns:
            name = ann_name(ann, k)
            box = self._box(ann, name, image["id"], size)
            if box is None:
                continue
            is_crowd = bool(ann.get("iscrowd", 0))
            boxes.append(box)
            labels.append(label_of[ann["category_id"]])
            crowd.append(is_crowd)
            # Crowd regions count as VOC "difficult": VOC AP then ignores detections on them.
            difficult.append(is_crowd or bool(ann.get("difficult", 0)))
            truncated.append(bool(ann.get("truncated", 0)))
        file_name = image["file_name"].replace("\\", "/")
        return ImageRecord(
            image_id=str(PurePosixPath(file_name).with_suffix("")),
            path=path,
            width=size[0],
            height=size[1],
            boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64),
            difficult=np.asarray(difficult, dtype=bool),
            truncated=np.asarray(truncated, dtype=bool),
            crowd=np.asarray(crowd, dtype=bool),
        )

    # -- the VOCDataset interface -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def index(self, image_id: str) -> int:
        """Position of ``image_id`` (a record id, the file stem) in ``records``."""
        try:
            return self._index[image_id]
        except KeyError:
            raise UserInputError(f"image id {image_id!r} is not in {self.json_path}") from None

    def coco_image_id(self, image_id: str) -> Any:
        """The COCO ``id`` of the record ``image_id`` (to map outputs back to the JSON)."""
        return self.coco_image_ids[self.index(image_id)]

    def __repr__(self) -> str:
        return (
            f"COCODataset(json_path={str(self.json_path)!r}, images_dir={str(self.root)!r}, "
            f"split={self.split!r}, images={len(self)}, classes={len(self.class_names)})"
        )
