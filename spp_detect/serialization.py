"""The one way spp_detect reads and writes its ``.pt`` files (models, fine-tuning checkpoints,
feature caches, saved detections).

Files are shared between people, so reading one must be as safe as reading an image: every file
holds plain types only (dict, list, tuple, str, int, float, bool, None) and tensors, is written
atomically, and is read with ``torch.load(..., weights_only=True)``, whose restricted unpickler
refuses any other object before it is built, so a crafted file cannot run code.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Union

import torch

from .errors import UnsafeFileError, UserInputError
from .utils import atomic_path

__all__ = ["check_plain", "load_file", "load_keyed", "save_file"]

PathLike = Union[str, Path]

logger = logging.getLogger(__name__)

_SCALARS = (str, int, float, bool, type(None))
_TORCH = (torch.Tensor, torch.dtype, torch.Size)


def check_plain(obj: Any, where: str = "") -> None:
    """Raise ``TypeError`` (a bug in the caller) if ``obj`` holds anything but plain types and
    tensors, naming the first offending key path."""
    # Exact types: a numpy float64 is a float subclass but pickles as a numpy object, which
    # ``weights_only`` loading refuses.
    if type(obj) in _SCALARS or isinstance(obj, _TORCH):
        return
    if isinstance(obj, dict) and type(obj).__module__ in ("builtins", "collections"):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where or 'object'}: key {k!r} is not a str or int")
            check_plain(v, f"{where}.{k}" if where else str(k))
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where or 'object'}: {type(obj).__name__} is not a plain type or tensor")


def save_file(obj: Any, path: PathLike) -> Path:
    """Write ``obj`` (plain types and tensors only) to ``path`` atomically."""
    check_plain(obj)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def load_file(path: PathLike, what: str = "file", map_location: Any = "cpu") -> Any:
    """Read a file written by :func:`save_file` without running any code it may carry.

    Args:
        path: the file.
        what: what the file should be, for the error message ("model file", "cache").
    Raises:
        UserInputError: the file is missing or is not a readable torch file.
        UnsafeFileError: the file holds objects other than plain types and tensors (it is
            refused before any of them is created).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UnsafeFileError(
                f"{path}: refused: the {what} holds objects other than tensors and plain "
                "types (it could run code when loaded)"
            ) from None
        raise UserInputError(f"{path}: not a readable {what} ({reason[:200]})") from None
    except Exception as exc:  # noqa: BLE001 - any other failure to parse a user's file
        raise UserInputError(f"{path}: not a readable {what} ({type(exc).__name__})") from None


def load_keyed(path: PathLike, key: str, what: str = "cache file") -> Any:
    """A cache or checkpoint entry written as ``{"key": key, ...}``: the dict when ``path``
    exists, is readable and holds ``key``; ``None`` otherwise (a damaged file is logged as a
    warning, so the caller recomputes it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = load_file(path, what=what)
    except ValueError as exc:
        logger.warning("%s; recomputing", exc)
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None
