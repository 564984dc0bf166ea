"""VOC results files: ``<prefix>_<split>_<class>.txt``, one per class (the devkit's
``VOCopts.detrespath``, ``comp4`` = trained on our own data).

Each line is ``image_id score xmin ymin xmax ymax`` with the box in VOC's 1-based inclusive
pixels (the devkit reads them with ``textread(..., '%s %f %f %f %f %f')``). Numbers are written
with 9 significant digits, which identify a float32 exactly, so scoring the files gives the same
AP as scoring the detections in memory (``VOCEvaluator.process``).
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Sequence, Union

import numpy as np

from ..errors import UserInputError
from ..structures.voc_pixels import boxes_to_voc_pixels
from ..utils import atomic_write_text

__all__ = ["VOCClassResults", "read_voc_results", "results_path", "write_voc_results"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class VOCClassResults(NamedTuple):
    """The detections of one class, in file order.

    Attributes:
        image_index (int64 [D]): index into the ``image_ids`` given to ``read_voc_results``.
        scores (float32 [D]).
        boxes (float32 [D, 4]): xmin, ymin, xmax, ymax in VOC 1-based inclusive pixels.
    """

    image_index: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


def results_path(results_dir: PathLike, split: str, class_name: str, prefix="comp4_det") -> Path:
    return Path(results_dir) / f"{prefix}_{split}_{class_name}.txt"


def write_voc_results(
    out_dir: PathLike,
    split: str,
    class_names: Sequence[str],
    dets_by_image: Mapping[str, "Detections"],  # noqa: F821 - structures.Detections
    prefix: str = "comp4_det",
) -> List[Path]:
    """Write one results file per class (an empty file for a class without detections).

    Args:
        out_dir: folder, created if needed.
        split: e.g. "test" (part of the file names).
        class_names: label order of the detections.
        dets_by_image: ``{image_id: Detections}``, boxes in the continuous frame (converted to
            VOC pixels here by ``structures.voc_pixels.boxes_to_voc_pixels``). Lines follow this
            mapping's order, then the detection order, which is the tie order when scored.
    Returns:
        the written paths, in ``class_names`` order. Each file is written atomically.
    """
    lines: Dict[int, List[str]] = defaultdict(list)
    num_classes = len(class_names)
    for image_id, dets in dets_by_image.items():
        image_id = str(image_id)
        if not image_id or any(c.isspace() for c in image_id):
            raise ValueError(f"image id {image_id!r} is empty or contains whitespace")
        if len(dets) == 0:
            continue
        boxes = boxes_to_voc_pixels(dets.boxes)
        scores = dets.scores.detach().cpu().numpy().astype(np.float32)
        labels = dets.labels.detach().cpu().numpy().astype(np.int64)
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image {image_id!r}: non-finite box or score")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"image {image_id!r}: label {int(labels.max())} out of range for "
                f"{num_classes} classes"
            )
        # 9 significant digits read back to the same float32 (a float32 needs at most 9).
        rows = np.concatenate([scores[:, None], boxes], axis=1).tolist()
        for row, k in zip(rows, labels.tolist()):
            lines[k].append("%s %.9g %.9g %.9g %.9g %.9g" % (image_id, *row))
    paths = []
    for k, name in enumerate(class_names):
        path = results_path(out_dir, split, name, prefix)
        atomic_write_text(path, "".join(line + "\n" for line in lines.get(k, [])))
        paths.append(path)
    logger.info(
        "wrote %d detections to %d results files in %s",
        sum(len(v) for v in lines.values()), len(paths), out_dir,
    )  # fmt: skip
    return paths


def _parse_lines(path: Path, lines: List[str], index: Mapping[str, int]):
    """Line-by-line parse with ``file:line`` errors (also used to locate an error found by the
    vectorised path)."""
    image_index: List[int] = []
    values: List[List[float]] = []
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue  # a blank line holds no detection
        if len(fields) != 6:
            raise UserInputError(
                f"{path}:{lineno}: expected 6 fields 'image_id score xmin ymin xmax ymax', "
                f"got {len(fields)}"
            )
        i = index.get(fields[0])
        if i is None:
            raise UserInputError(
                f"{path}:{lineno}: unknown image id {fields[0]!r} (not in the split)"
            )
        try:
            row = [float(v) for v in fields[1:]]
        except ValueError:
            bad = next(v for v in fields[1:] if not _is_float(v))
            raise UserInputError(f"{path}:{lineno}: not a number: {bad!r}") from None
        if not all(math.isfinite(v) for v in row):
            raise UserInputError(f"{path}:{lineno}: non-finite value in {line.strip()!r}")
        image_index.append(i)
        values.append(row)
    return np.asarray(image_index, dtype=np.int64), np.asarray(values, np.float64).reshape(-1, 5)


def _parse_file(path: Path, index: Mapping[str, int]) -> VOCClassResults:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [line.split() for line in lines]
    rows = [r for r in rows if r]
    try:
        # Fast path: numpy parses the numbers; any problem -> the line-by-line parse names it.
        if any(len(r) != 6 for r in rows):
            raise ValueError
        image_index = np.array([index[r[0]] for r in rows], dtype=np.int64)
        values = np.array([float(v) for r in rows for v in r[1:]], np.float64).reshape(-1, 5)
        if not np.isfinite(values).all():
            raise ValueError
    except (KeyError, ValueError):
        image_index, values = _parse_lines(path, lines, index)
    inverted = int(((values[:, 3] < values[:, 1] - 1) | (values[:, 4] < values[:, 2] - 1)).sum())
    if inverted:
        # Kept (the devkit scores them, as false positives), but they usually mean the boxes
        # were written as x, y, w, h.
        logger.warning("%s: %d boxes with xmax < xmin - 1 or ymax < ymin - 1", path, inverted)
    return VOCClassResults(
        image_index=image_index,
        scores=values[:, 0].astype(np.float32),
        boxes=values[:, 1:].astype(np.float32),
    )


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def read_voc_results(
    results_dir: PathLike,
    split: str,
    class_names: Sequence[str],
    image_ids: Sequence[str],
    prefix: str = "comp4_det",
) -> Dict[str, VOCClassResults]:
    """Read the results file of every class; nothing is dropped silently.

    Values are stored as float32 (as ``write_voc_results`` wrote them); blank lines are skipped.

    Returns:
        ``{class_name: VOCClassResults}`` for every class, in ``class_names`` order.
    Raises:
        ValueError: the folder or a class file is missing (named), a line is malformed or names
            an image not in ``image_ids`` (``file:line: reason``).
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserInputError(f"{results_dir}: results folder not found")
    index = {str(i): k for k, i in enumerate(image_ids)}
    out: Dict[str, VOCClassResults] = {}
    for name in class_names:
        path = results_path(results_dir, split, name, prefix)
        if not path.is_file():
            raise UserInputError(
                f"{path}: missing results file for class {name!r} (one "
                f"{prefix}_{split}_<class>.txt per class is needed; an empty file means no "
                "detections)"
            )
        out[name] = _parse_file(path, index)
    logger.info(
        "read %d detections of %d classes from %s",
        sum(len(r.scores) for r in out.values()), len(out), results_dir,
    )  # fmt: skip
    return out
