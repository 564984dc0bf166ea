"""The images an ``--input`` names: a folder, one file, a glob or a list of files, each with the
name it keeps in the outputs, and the precomputed windows of an image by that name.

Worker processes import this module's neighbours, so it imports no torch (startup time).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from spp_detect.datasets.images import SUPPORTED_EXTENSIONS, list_images
from spp_detect.errors import UserInputError

__all__ = ["resolve_inputs", "describe_input", "precomputed_windows"]

PathLike = Union[str, os.PathLike]
InputSpec = Union[PathLike, Sequence[PathLike]]

_GLOB_CHARS = set("*?[")


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard component."""
    base: List[str] = []
    for part in Path(pattern).parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def describe_input(input_path: InputSpec) -> str:
    """How the input is named in logs and in ``detections.json``."""
    if isinstance(input_path, (list, tuple)):
        return f"{len(input_path)} listed files"
    return os.fspath(input_path)


def resolve_inputs(
    input_path: InputSpec, exclude: Optional[PathLike] = None
) -> List[Tuple[Path, str]]:
    """The images an ``--input`` names, each with its name relative to the input.

    Args:
        input_path: a folder (recursive), one file, a glob (``**`` recursive), or a list of
            files (named by their file names).
        exclude: a folder whose files are left out (the output folder, when it lies inside
            the input folder, so that annotated images are never read back as inputs).
    Returns:
        ``[(path, relative_name)]`` sorted by path; ``relative_name`` uses ``/`` and is
        relative to the folder, to the glob's fixed prefix, or the file's own name.
    Raises:
        UserInputError: the path does not exist, or names no image.
    """
    if isinstance(input_path, (list, tuple)):
        # An explicit list (the demo's test split): every file is kept, named by its name.
        paths = sorted((Path(p) for p in input_path), key=str)
        base = None
    else:
        text = os.fspath(input_path)
        paths = list_images(text)
        p = Path(text)
        base = p if p.is_dir() else (p.parent if p.is_file() else _glob_base(text))
    excl = Path(exclude).resolve() if exclude is not None else None
    out: List[Tuple[Path, str]] = []
    for path in paths:
        if excl is not None and excl in path.resolve().parents:
            continue
        try:
            rel = path.relative_to(base).as_posix() if base is not None else path.name
        except ValueError:  # a glob match outside the fixed prefix (``..`` in the pattern)
            rel = path.name
        out.append((path, rel))
    if not out:
        kinds = ", ".join(SUPPORTED_EXTENSIONS)
        raise UserInputError(f"{describe_input(input_path)}: no images found (looked for {kinds})")
    return out


def precomputed_windows(
    proposals: Optional[Mapping[str, np.ndarray]], name: str
) -> Optional[np.ndarray]:
    """The precomputed windows (float32 ``[R, 4]`` xyxy, image pixels) of the image ``name``
    (relative name): looked up by the name without its suffix (``sub/a``), then by the file's
    stem (``a``, the image id of VOC and of ``load_proposals_file``); ``None`` if absent."""
    if proposals is None:
        return None
    no_suffix = str(Path(name).with_suffix("")).replace(os.sep, "/")
    for key in (no_suffix, Path(name).stem):
        if key in proposals:
            return np.asarray(proposals[key], dtype=np.float32).reshape(-1, 4)
    return None
