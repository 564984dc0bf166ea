"""Proposal files: precomputed windows of many images in one file (``.npz``, or R-CNN's
published selective-search ``.mat`` files).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Union

import numpy as np

from spp_detect.utils import atomic_path

__all__ = ["load_proposals_file", "save_proposals_file"]

PathLike = Union[str, os.PathLike]


def load_proposals_file(path: PathLike) -> Dict[str, np.ndarray]:
    """Read precomputed proposals.

    Formats:
        ``.npz``: one array per image, ``{image_id: float32 [R, 4]}``, continuous xyxy (what
            :func:`save_proposals_file` writes).
        ``.mat``: R-CNN's published selective-search files (``selective_search_data/
            voc_2007_<split>.mat``) with cell arrays ``images`` (ids) and ``boxes`` (one
            [R, 4] matrix per image, MATLAB's 1-based inclusive pixels in the order
            ``[y1 x1 y2 x2]``: R-CNN keeps the row/column order of the selective search
            code; Fast R-CNN's ``pascal_voc.py`` reads them with ``boxes[:, (1, 0, 3, 2)] - 1``).
            Converted here to continuous xyxy: ``x1 = c1 - 1, y1 = r1 - 1, x2 = c2, y2 = r2``
            (the pixel with 1-based column ``c2`` ends at continuous ``x = c2``).
    Returns:
        ``{image_id: np.ndarray[R, 4] float32}``, continuous xyxy in pixels of each image.
    Raises:
        ValueError: ``"<path>: <reason>"`` for a missing, unreadable or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: proposals file not found")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path)
    if suffix == ".mat":
        return _load_mat(path)
    raise ValueError(f"{path}: unknown proposals file type {suffix!r} (expected .npz or .mat)")


def save_proposals_file(path: PathLike, proposals: Dict[str, np.ndarray]) -> Path:
    """Write ``{image_id: [R, 4] continuous xyxy}`` as an ``.npz`` (atomically)."""
    path = Path(path)
    arrays = {
        str(k): np.ascontiguousarray(v, dtype=np.float32).reshape(-1, 4)
        for k, v in proposals.items()
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        np.savez(out, **arrays)
    return path


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    out = {}
    for image_id, boxes in raw.items():
        out[image_id] = _check_boxes(path, image_id, boxes)
    return out


def _load_mat(path: Path) -> Dict[str, np.ndarray]:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # scipy comes with scikit-learn, a dependency
        raise ValueError(f"{path}: reading .mat files needs scipy") from e
    try:
        mat = loadmat(str(path))
    except NotImplementedError as e:  # MATLAB v7.3 files are HDF5
        raise ValueError(
            f"{path}: MATLAB v7.3 (HDF5) files are not supported; save it with -v7 ({e})"
        ) from e
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as a MATLAB file ({type(e).__name__}: {e})") from e
    missing = [k for k in ("images", "boxes") if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(
            f"{path}: expected variables 'images' and 'boxes' (R-CNN format), "
            f"missing {missing}, found {found}"
        )
    ids = _mat_strings(path, mat["images"])
    cells = np.asarray(mat["boxes"])
    cells = cells.ravel() if cells.dtype == object else [cells] if len(ids) == 1 else None
    if cells is None:
        raise ValueError(f"{path}: 'boxes' must be a cell array with one matrix per image")
    if len(cells) != len(ids):
        raise ValueError(f"{path}: {len(ids)} images but {len(cells)} box matrices")
    out = {}
    for image_id, b in zip(ids, cells):
        b = np.asarray(b, dtype=np.float64)
        if b.size == 0:
            out[image_id] = np.zeros((0, 4), dtype=np.float32)
            continue
        b = _check_boxes(path, image_id, b, cast=False)
        # R-CNN: 1-based inclusive [y1 x1 y2 x2] -> continuous [x1, y1, x2, y2].
        xyxy = np.stack([b[:, 1] - 1, b[:, 0] - 1, b[:, 3], b[:, 2]], axis=1)
        out[image_id] = xyxy.astype(np.float32)
    return out


def _mat_strings(path: Path, arr: np.ndarray) -> List[str]:
    """Image ids from a MATLAB cell array of strings (or a char matrix, one id per row)."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "U":
        return [str(s).strip() for s in arr.ravel()]
    if arr.dtype != object:
        raise ValueError(f"{path}: 'images' must be a cell array of image ids, got {arr.dtype}")
    out = []
    for cell in arr.ravel():
        cell = np.asarray(cell)
        if cell.dtype.kind != "U" or cell.size != 1:
            raise ValueError(
                f"{path}: 'images' must hold one string per image, got {cell.dtype} {cell.shape}"
            )
        out.append(str(cell.ravel()[0]).strip())
    return out


def _check_boxes(path: Path, image_id: str, boxes: np.ndarray, cast: bool = True) -> np.ndarray:
    boxes = np.asarray(boxes)
    if boxes.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype.kind not in "fiu":
        raise ValueError(
            f"{path}: boxes of {image_id!r} must be a numeric [R, 4] array, got "
            f"{boxes.dtype} {boxes.shape}"
        )
    if not np.isfinite(boxes).all():
        raise ValueError(f"{path}: boxes of {image_id!r} hold non-finite values")
    return boxes.astype(np.float32) if cast else boxes
