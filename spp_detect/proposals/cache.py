"""Proposals computed once per image and kept on disk (``ProposalCache``).

Layout: ``cache_dir/<image_id>.npz`` holding ``boxes`` (float32 [R, 4], continuous xyxy in
pixels of the image as ``datasets.images.read_image`` returns it, i.e. EXIF orientation applied)
and ``key`` (a JSON string). The key records everything that determines the boxes: the
``ProposalSettings``, the OpenCV version, this module's ``CACHE_VERSION`` and a hash of the
image file's bytes (so a copied or touched file is still recognised, and an edited one is not).
A file whose key differs is recomputed and replaced. Files are written through
``utils.atomic_path`` (temporary file, fsync, rename), so an interrupted run never leaves a
partial ``.npz``; a file that cannot be read anyway (disk full, manual edits) is logged and
recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

from spp_detect.datasets.images import ImageReadError, decode_image
from spp_detect.proposals.selective_search import selective_search
from spp_detect.proposals.settings import ProposalSettings
from spp_detect.utils import atomic_path, bytes_digest

__all__ = ["CACHE_VERSION", "ProposalCache", "read_image_bytes"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Bump when the meaning or layout of a cached file changes: every older file is recomputed.
CACHE_VERSION = 2
_TMP_GLOB = ".*.tmp"  # temporary files of utils.atomic_path
_STALE_TMP_SECONDS = 3600  # leftovers of killed runs older than this are removed
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class ProposalCache:
    """Selective-search windows of images, one ``.npz`` per image in ``cache_dir``.

    Args:
        cache_dir: folder for the files (created when first written).
        settings: how the windows are computed; any change invalidates the cached files.
    """

    def __init__(self, cache_dir: PathLike, settings: ProposalSettings) -> None:
        import cv2

        if not isinstance(settings, ProposalSettings):
            raise TypeError(f"settings must be a ProposalSettings, got {type(settings).__name__}")
        self.cache_dir = Path(cache_dir)
        self.settings = settings
        self._key_fields: Dict[str, Any] = dict(
            version=CACHE_VERSION, opencv=cv2.__version__, **settings.to_dict()
        )
        self.computed = 0  # selective search runs by this object (statistics)
        self.reused = 0  # cache hits served by this object

    def path_for(self, image_id: str) -> Path:
        """The cache file of ``image_id`` (ids that are not plain file names get a hash)."""
        image_id = str(image_id)
        if _SAFE_ID.fullmatch(image_id) and len(image_id) <= 200:
            name = image_id
        else:
            digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).hexdigest()
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-80:].lstrip(".") + "-" + digest
        return self.cache_dir / f"{name}.npz"

    def key(
        self,
        image_id: str,
        path: Optional[PathLike] = None,
        data: Optional[bytes] = None,
        image: Optional[np.ndarray] = None,
    ) -> str:
        """The JSON key a valid cache file of this image must hold.

        The image is identified by the hash of its file's bytes (``data``, or read from
        ``path``), or, for an in-memory image without a file, by a hash of its pixels.
        """
        if data is None and path is not None:
            data = read_image_bytes(path)
        if data is not None:
            ident: Dict[str, Any] = dict(blake2b=bytes_digest(data))
        elif image is not None:
            arr = np.ascontiguousarray(image)
            ident = dict(pixels=bytes_digest(arr.tobytes()), shape=list(arr.shape))
        else:
            raise ValueError(f"{image_id}: need an image path or the image itself")
        return json.dumps(
            dict(image_id=str(image_id), image=ident, **self._key_fields), sort_keys=True
        )

    def load(self, image_id: str, key: str) -> Optional[np.ndarray]:
        """Cached boxes of ``image_id`` if its file exists, is readable and holds ``key``."""
        f = self.path_for(image_id)
        if not f.is_file():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                stored = str(z["key"][()])
                boxes = np.asarray(z["boxes"])
        except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
            logger.warning(
                "%s: unreadable proposal cache file, recomputing (%s: %s)", f, type(e).__name__, e
            )
            return None
        if stored != key:
            logger.debug("%s: stale (image or settings changed), recomputing", f)
            return None
        if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype != np.float32:
            logger.warning("%s: malformed boxes %s %s, recomputing", f, boxes.shape, boxes.dtype)
            return None
        return boxes

    def save(self, image_id: str, key: str, boxes: np.ndarray) -> Path:
        """Write the cache file atomically (temporary file, fsync, rename)."""
        f = self.path_for(image_id)
        boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
        with atomic_path(f) as tmp, open(tmp, "wb") as out:
            np.savez(out, boxes=boxes, key=np.array(key))
        return f

    def get(
        self, image_id: str, path: Optional[PathLike] = None, image: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """Proposals of one image, from the cache or computed (and then cached).

        Args:
            image_id: names the cache file.
            path: the image file (hashed, and decoded when ``image`` is not given).
            image: the decoded image (np.ndarray[H, W, 3] uint8 RGB, as ``read_image`` gives
                for ``path``) to skip decoding; without ``path`` its pixels are the key.
        Returns:
            np.ndarray[R, 4] float32, continuous xyxy in pixels of the image.
        Raises:
            ImageReadError: the image cannot be read.
        """
        data = read_image_bytes(path) if path is not None else None
        k = self.key(image_id, data=data, image=image)
        boxes = self.load(image_id, k)
        if boxes is not None:
            self.reused += 1
            return boxes
        if image is None:
            if data is None:
                raise ValueError(f"{image_id}: need an image path or the image itself")
            image = decode_image(data, path)
        boxes = selective_search(image, self.settings)
        self.save(image_id, k, boxes)
        self.computed += 1
        return boxes

    def clean_tmp(self, older_than: float = _STALE_TMP_SECONDS) -> int:
        """Remove temporary files left by killed runs; returns how many were removed."""
        if not self.cache_dir.is_dir():
            return 0
        now, n = time.time(), 0
        for f in self.cache_dir.glob(_TMP_GLOB):
            try:
                if now - f.stat().st_mtime > older_than:
                    f.unlink()
                    n += 1
            except OSError:
                pass
        return n


def read_image_bytes(path: PathLike) -> bytes:
    """The bytes of an image file; ``ImageReadError`` naming the file when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageReadError(
            path, "file not found (missing, or deleted after it was listed)"
        ) from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image file") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e.strerror or e})") from e
