"""Parsing a COCO instances JSON: its categories, images and annotations, checked.

A structural fault (malformed JSON, a missing key, an annotation whose image or category does
not exist, a repeated id) raises ``UserInputError`` naming the file and the entry. Used by
``datasets/coco.py``'s ``COCODataset``.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UserInputError

__all__ = [
    "ann_name",
    "group_annotations",
    "is_int",
    "load_json",
    "parse_categories",
    "parse_images",
    "split_name",
]


def ann_name(ann: Dict[str, Any], k: int) -> str:
    return f"annotation id {ann['id']!r}" if "id" in ann else f"annotation #{k} (no id)"


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def hashable(v: Any) -> bool:
    return isinstance(v, (int, str, float)) or v is None


def load_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise UserInputError(f"{path}: COCO annotation file not found")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: not a COCO instances file (the top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserInputError(f"{path}: not a COCO instances file (no {key!r} list)")
    return data


def split_name(json_path: Path) -> str:
    """``instances_val2017.json`` -> ``val2017`` (the COCO naming); other names: the stem."""
    stem = json_path.stem
    return stem[len("instances_") :] if stem.startswith("instances_") and len(stem) > 10 else stem


def parse_categories(
    json_path: Path, categories: List[Any], class_names: Optional[Sequence[str]]
) -> Tuple[List[int], List[str]]:
    """``(category_ids, class_names)``, both in label order."""
    names: Dict[int, str] = {}
    for k, cat in enumerate(categories):
        if not isinstance(cat, dict) or not is_int(cat.get("id")) or "name" not in cat:
            raise UserInputError(f"{json_path}: category #{k} needs an integer 'id' and a 'name'")
        if cat["id"] in names:
            raise UserInputError(f"{json_path}: category id {cat['id']} is repeated")
        names[cat["id"]] = str(cat["name"])
    if len(set(names.values())) != len(names):
        dup = sorted(n for n in set(names.values()) if list(names.values()).count(n) > 1)
        raise UserInputError(f"{json_path}: category name {dup[0]!r} is repeated")
    if class_names is None:
        ids = sorted(names)
        return ids, [names[i] for i in ids]
    class_names = [str(c) for c in class_names]
    if len(set(class_names)) != len(class_names):
        raise UserInputError(f"class_names has duplicates: {class_names}")
    id_of = {n: i for i, n in names.items()}
    unknown = [n for n in names.values() if n not in class_names]
    if unknown:
        raise UserInputError(
            f"{json_path}: category {unknown[0]!r} is not one of the "
            f"{len(class_names)} classes ({', '.join(class_names[:5])}"
            f"{', ...' if len(class_names) > 5 else ''})"
        )
    absent = [c for c in class_names if c not in id_of]
    if absent:
        raise UserInputError(f"{json_path}: class {absent[0]!r} is not a category")
    return [id_of[c] for c in class_names], class_names


def parse_images(json_path: Path, images: List[Any]) -> Dict[Any, Dict[str, Any]]:
    """COCO id -> image entry, in file order; record ids (file stems) checked unique."""
    out: Dict[Any, Dict[str, Any]] = {}
    stems: Dict[str, Any] = {}
    for k, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise UserInputError(f"{json_path}: image #{k} needs an 'id' and a 'file_name'")
        coco_id, file_name = image["id"], image["file_name"]
        if not (is_int(coco_id) or isinstance(coco_id, str)):
            raise UserInputError(
                f"{json_path}: image #{k}: id {coco_id!r} is not an integer or string"
            )
        if coco_id in out:
            raise UserInputError(f"{json_path}: image id {coco_id!r} is repeated")
        if not isinstance(file_name, str) or not file_name or Path(file_name).is_absolute():
            raise UserInputError(
                f"{json_path}: image id {coco_id!r}: 'file_name' must be a relative "
                f"path, got {file_name!r}"
            )
        stem = str(PurePosixPath(file_name.replace("\\", "/")).with_suffix(""))
        if any(c.isspace() for c in stem):
            # VOC results files separate fields by whitespace
            raise UserInputError(
                f"{json_path}: image id {coco_id!r}: file_name {file_name!r} contains whitespace"
            )
        if stem in stems:
            raise UserInputError(
                f"{json_path}: images {stems[stem]!r} and {coco_id!r} have the same "
                f"file name stem {stem!r}"
            )
        stems[stem] = coco_id
        out[coco_id] = image
    return out


def group_annotations(
    json_path: Path,
    annotations: List[Any],
    images: Dict[Any, Dict[str, Any]],
    label_of: Dict[int, int],
) -> Dict[Any, List[Tuple[int, Dict[str, Any]]]]:
    """COCO image id -> its ``(position in the file, annotation)`` pairs; ids checked unique and
    every image and category id checked to exist."""
    by_image: Dict[Any, List[Tuple[int, Dict[str, Any]]]] = {i: [] for i in images}
    seen_ann: Dict[Any, int] = {}
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise UserInputError(f"{json_path}: annotation #{k} is not an object")
        name = ann_name(ann, k)
        if "id" in ann:
            if ann["id"] in seen_ann:
                raise UserInputError(f"{json_path}: {name} is repeated")
            seen_ann[ann["id"]] = k
        image_id = ann.get("image_id")
        if not hashable(image_id) or image_id not in by_image:
            raise UserInputError(
                f"{json_path}: {name} refers to image_id {image_id!r}, which is not in 'images'"
            )
        if not hashable(ann.get("category_id")) or ann["category_id"] not in label_of:
            raise UserInputError(
                f"{json_path}: {name} refers to category_id "
                f"{ann.get('category_id')!r}, which is not in 'categories'"
            )
        by_image[image_id].append((k, ann))
    return by_image
