"""Small shared utilities: atomic file writes, device selection and a per-stage timer."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from .errors import UserInputError

__all__ = [
    "atomic_path",
    "bytes_digest",
    "json_safe",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "resolve_device",
    "StageTimer",
]


_TMP_SUFFIX = ".tmp"  # temporary files of atomic_path: ".<name>.<random>.tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target folder; move it onto ``path`` only on success, so a
    reader never sees a half-written file and an interrupted run leaves the old file intact.

    The temporary file is created with mode ``0o666`` and the kernel applies the process umask
    (``mkstemp`` would make it ``0o600``; reading the umask would mean changing it, which races
    with other threads). Its data is flushed to the disk (``fsync``) before the rename, so after
    a power cut ``path`` holds the old or the new content, never an empty file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _create_temp(path: Path) -> Path:
    """Create an empty, new file next to ``path`` (``O_EXCL``: never an existing one)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path}: no free temporary file name in {path.parent}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def bytes_digest(data: bytes) -> str:
    """BLAKE2b (128-bit) hex digest of ``data``: how caches recognise a file's content."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(obj: Any) -> Any:
    """Plain JSON values: NaN/inf -> None (strict JSON has no NaN), numpy and torch scalars and
    arrays -> Python numbers and lists, paths -> strings."""
    if hasattr(obj, "tolist"):  # numpy / torch scalar or array
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (NaN as null), atomically."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when present, else CPU. Asking for CUDA without one fails."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"--device {device}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {device}: CUDA is not available on this machine")
    return dev


class StageTimer:
    """Accumulates wall time per named stage, synchronising the device before each clock read
    so that asynchronous CUDA work is charged to the stage that launched it."""

    def __init__(self, device: Optional[torch.device | str] = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.times: Dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[stage] += time.perf_counter() - start

    def reset(self) -> Dict[str, float]:
        """Return the accumulated times and start again."""
        out = dict(self.times)
        self.times = defaultdict(float)
        return out


def null_timer() -> StageTimer:
    """A timer whose figures nobody reads (no device sync, so no slowdown on CUDA)."""
    return StageTimer(None)


# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
_M_MMAP_THRESHOLD = -3
# Blocks of at least this size come straight from mmap and go back to the system when freed.
_MMAP_THRESHOLD_BYTES = 1 << 20


def limit_heap_growth() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process (a no-op elsewhere).

    glibc raises the threshold after large blocks are freed, so the conv maps of images of
    many sizes end up on the heap, which fragments and is never returned: peak RSS then grows
    with the number of images (measured: 813 -> 1,888 MB over 24 backbone passes at distinct
    widths; about 860 MB flat with the threshold fixed, as ``MALLOC_MMAP_THRESHOLD_=1048576``
    does). Returns whether the setting was applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc: nothing to do
        return False
