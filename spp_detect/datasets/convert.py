"""Conversion between the VOC and COCO dataset formats (``tools/convert_dataset.py``).

Both directions go through the in-memory records (``ImageRecord``, continuous xyxy boxes):

- VOC -> COCO: ``VOCDataset`` -> ``OUTPUT/annotations/instances_<split>.json`` and the images
  in ``OUTPUT/<split>/`` (the layout of COCO's ``annotations/instances_val2017.json`` +
  ``val2017/``), read back by ``datasets.coco.COCODataset``.
- COCO -> VOC: ``COCODataset`` -> ``ROOT/VOC<year>/{Annotations/<id>.xml, JPEGImages/<id>.<ext>,
  ImageSets/Main/<split>.txt}``, read back by ``datasets.voc.VOCDataset``.

Boxes: COCO ``bbox = [x1, y1, x2 - x1, y2 - y1]`` (same continuous frame, no ``+1``); VOC's
1-based inclusive pixels through ``structures.voc_pixels`` (the project's one ``+1``
convention; ``datasets/voc.py`` reads them back with its inverse). Integer VOC boxes therefore
survive VOC -> COCO -> VOC exactly.

Flags COCO has no field for are written as extra 0/1 annotation fields ``difficult`` and
``truncated`` (``COCODataset`` reads them; pycocotools and detectron2 ignore them). COCO crowd
regions (``iscrowd = 1``) become VOC ``difficult`` objects, the VOC way of saying "ignore in
AP"; the summary counts them (``crowd_as_difficult``), since VOC cannot mark them as crowd.

Images are symlinked (default), hard-linked or copied. Every file is written atomically
(``utils.atomic_path``), the images first, then the annotations, and the JSON or the split
file last: a split that is listed is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ..errors import UserInputError
from ..structures.voc_pixels import boxes_to_voc_pixels
from ..utils import atomic_path, atomic_write_bytes, atomic_write_text
from .coco import COCODataset
from .voc import VOCDataset

__all__ = ["IMAGE_MODES", "coco_to_voc", "voc_to_coco", "write_coco", "write_voc"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# How the image files reach the converted dataset.
IMAGE_MODES = ("symlink", "hardlink", "copy")

# A VOC id names files in Annotations/ and JPEGImages/, and is a field of the results files.
_VOC_ID = re.compile(r"[^\s/\\]+")


def place_image(src: Path, dst: Path, mode: str = "symlink") -> None:
    """Make ``dst`` the image ``src``: an absolute symlink, a hard link or a copy, atomically
    (``dst`` is replaced, never half-written). Nothing is done when ``dst`` already is ``src``."""
    if mode not in IMAGE_MODES:
        raise UserInputError(f"image mode {mode!r} is not one of {', '.join(IMAGE_MODES)}")
    src = Path(src)
    if not src.is_file():
        raise UserInputError(f"{src}: image not found")
    if dst.exists() and os.path.samefile(src, dst):
        return
    with atomic_path(dst) as tmp:
        if mode == "copy":
            shutil.copyfile(src, tmp)
        else:
            tmp.unlink()  # atomic_path made a placeholder file; the link takes its name
            if mode == "symlink":
                os.symlink(src.resolve(), tmp)
            else:
                os.link(src, tmp)


def _categories(dataset) -> List[int]:
    ids = getattr(dataset, "category_ids", None)
    return (
        [int(i) for i in ids] if ids is not None else list(range(1, len(dataset.class_names) + 1))
    )


def write_coco(
    dataset, json_path: PathLike, images_dir: PathLike, images: str = "symlink"
) -> Dict[str, Any]:
    """Write ``dataset`` (``records``, ``class_names``) as a COCO instances JSON + image folder.

    Args:
        dataset: a ``VOCDataset``, ``COCODataset`` or any object with ``records`` and
            ``class_names``. Its ``category_ids`` and ``coco_image_ids`` are kept when it has
            them; otherwise categories and images are numbered from 1 in dataset order.
        json_path: the instances file to write.
        images_dir: gets one image per record, named as its file (``file_name``).
        images: ``"symlink"``, ``"hardlink"`` or ``"copy"``.
    Returns:
        ``{"json", "images_dir", "images", "annotations", "crowd"}``.
    Raises:
        UserInputError: two records with the same image file name, or a missing image.
    """
    json_path, images_dir = Path(json_path), Path(images_dir)
    category_ids = _categories(dataset)
    image_ids = getattr(dataset, "coco_image_ids", None)
    if image_ids is None:
        image_ids = list(range(1, len(dataset.records) + 1))
    images_out, annotations, names = [], [], {}
    for coco_id, r in zip(image_ids, dataset.records):
        file_name = Path(r.path).name
        if file_name in names:
            raise UserInputError(
                f"images {names[file_name]!r} and {r.image_id!r} are both named {file_name!r}; "
                f"they cannot share {images_dir}"
            )
        names[file_name] = r.image_id
        images_out.append(
            {"id": coco_id, "file_name": file_name, "width": int(r.width), "height": int(r.height)}
        )
        boxes = np.asarray(r.boxes, dtype=np.float64)  # float32 values, exact in float64
        for box, label, crowd, difficult, truncated in zip(
            boxes.tolist(), r.labels.tolist(), r.crowd.tolist(), r.difficult.tolist(),
            r.truncated.tolist(),
        ):  # fmt: skip
            # Continuous xyxy -> COCO xywh: w = x2 - x1 (no +1; COCODataset adds it back).
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": coco_id,
                "category_id": category_ids[label],
                "bbox": [box[0], box[1], w, h],
                "area": w * h,
                "iscrowd": int(crowd),
                "difficult": int(difficult),
                "truncated": int(truncated),
            })  # fmt: skip
    for r in dataset.records:
        place_image(Path(r.path), images_dir / Path(r.path).name, images)
    data = {
        "info": {"description": f"converted by spp_detect from {_describe(dataset)}"},
        "licenses": [],
        "images": images_out,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": n, "supercategory": "none"}
            for i, n in zip(category_ids, dataset.class_names)
        ],
    }
    atomic_write_text(json_path, json.dumps(data) + "\n")  # last: a JSON means a complete set
    n_crowd = sum(a["iscrowd"] for a in annotations)
    logger.info(
        "%s: %d images, %d annotations (%d crowd); images in %s",
        json_path, len(images_out), len(annotations), n_crowd, images_dir,
    )  # fmt: skip
    return {
        "json": str(json_path),
        "images_dir": str(images_dir),
        "images": len(images_out),
        "annotations": len(annotations),
        "crowd": n_crowd,
    }


def _describe(dataset) -> str:
    if isinstance(dataset, COCODataset):
        return str(dataset.json_path)
    if isinstance(dataset, VOCDataset):
        return f"{dataset.root} VOC{dataset.year} {dataset.split}"
    return type(dataset).__name__


def _number(v: float) -> str:
    """A VOC coordinate: an integer as VOC writes it, else the shortest exact decimal."""
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def voc_annotation_xml(record, class_names, year: str, file_name: str) -> bytes:
    """The VOC XML of one record; boxes in VOC's 1-based inclusive pixels
    (``structures.voc_pixels.boxes_to_voc_pixels``, read back by ``datasets/voc.py``)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{year}"
    ET.SubElement(root, "filename").text = file_name
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "converted by spp_detect"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", record.width), ("height", record.height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(int(v))
    ET.SubElement(root, "segmented").text = "0"
    voc_boxes = boxes_to_voc_pixels(record.boxes)
    for box, label, difficult, truncated in zip(
        voc_boxes.tolist(), record.labels.tolist(), record.difficult.tolist(),
        record.truncated.tolist(),
    ):  # fmt: skip
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = class_names[label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(truncated))
        # Crowd regions are difficult in the record already (COCODataset): VOC's "ignore".
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bndbox, tag).text = _number(v)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def write_voc(
    dataset,
    voc_root: PathLike,
    year: str = "2007",
    split: Optional[str] = None,
    images: str = "symlink",
) -> Dict[str, Any]:
    """Write ``dataset`` as one split of a VOC-format dataset under the VOCdevkit ``voc_root``.

    Writes ``VOC<year>/Annotations/<id>.xml``, ``VOC<year>/JPEGImages/<id><ext>`` and, last,
    ``VOC<year>/ImageSets/Main/<split>.txt`` (other splits already there are kept, so several
    COCO files can become the splits of one VOC set). Per-class split files are not written
    (``VOCDataset`` does not need them).

    Args:
        dataset: any object with ``records`` and ``class_names`` (and ``split``, the default
            split name).
        images: ``"symlink"``, ``"hardlink"`` or ``"copy"``.
    Returns:
        ``{"voc_dir", "split", "images", "objects", "crowd_as_difficult"}``.
    Raises:
        UserInputError: an image id that cannot be a VOC file name (a ``/`` or whitespace).
    """
    split = str(split if split is not None else dataset.split)
    voc_dir = Path(voc_root) / f"VOC{year}"
    for r in dataset.records:
        if not _VOC_ID.fullmatch(r.image_id):
            raise UserInputError(
                f"image id {r.image_id!r} cannot name a VOC file (it has a '/' or whitespace)"
            )
    n_objects = n_crowd = 0
    for r in dataset.records:
        file_name = r.image_id + Path(r.path).suffix
        place_image(Path(r.path), voc_dir / "JPEGImages" / file_name, images)
        xml = voc_annotation_xml(r, dataset.class_names, str(year), file_name)
        atomic_write_bytes(voc_dir / "Annotations" / f"{r.image_id}.xml", xml)
        n_objects += len(r.labels)
        n_crowd += int(r.crowd.sum())
    atomic_write_text(
        voc_dir / "ImageSets" / "Main" / f"{split}.txt",
        "".join(f"{r.image_id}\n" for r in dataset.records),
    )
    if n_crowd:
        logger.warning(
            "%s: %d crowd regions written as difficult objects (VOC has no crowd flag)",
            voc_dir, n_crowd,
        )  # fmt: skip
    logger.info("%s %s: %d images, %d objects", voc_dir, split, len(dataset.records), n_objects)
    return {
        "voc_dir": str(voc_dir),
        "split": split,
        "images": len(dataset.records),
        "objects": n_objects,
        "crowd_as_difficult": n_crowd,
    }


def voc_to_coco(
    voc_root: PathLike,
    output_dir: PathLike,
    year: str = "2007",
    split: str = "trainval",
    images: str = "symlink",
) -> Dict[str, Any]:
    """VOC split -> ``output_dir/annotations/instances_<split>.json`` + ``output_dir/<split>/``.

    Returns ``write_coco``'s summary; ``COCODataset(summary["json"], summary["images_dir"])``
    reads it back.
    """
    dataset = VOCDataset(voc_root, year=year, split=split)
    output_dir = Path(output_dir)
    return write_coco(
        dataset, output_dir / "annotations" / f"instances_{split}.json", output_dir / split, images
    )


def coco_to_voc(
    json_path: PathLike,
    images_dir: PathLike,
    voc_root: PathLike,
    year: str = "2007",
    split: Optional[str] = None,
    images: str = "symlink",
) -> Dict[str, Any]:
    """COCO instances JSON + image folder -> one split of ``voc_root/VOC<year>``.

    ``split`` defaults to the JSON's name without ``instances_``. Returns ``write_voc``'s
    summary plus ``"skipped"``, what ``COCODataset`` skipped (bad boxes, missing images).
    """
    dataset = COCODataset(json_path, images_dir)
    summary = write_voc(dataset, voc_root, year=year, split=split, images=images)
    summary["skipped"] = dict(dataset.skipped)
    return summary
