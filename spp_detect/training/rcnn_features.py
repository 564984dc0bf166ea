"""Pooled window features of training images for the R-CNN baseline, cached on disk.

R-CNN runs the whole backbone per window, so its training cache holds every window's pooled
vector (R-CNN's feature cache; the paper's 200 GB on VOC07 against SPP-net's 20 GB of conv
maps). One file per image, written atomically (``serialization.save_file``) and keyed by
everything that determines it: all the backbone's weights, the image file's bytes, the exact
windows, the context padding, warp size, pooling levels, storage dtype and ``CACHE_VERSION``;
a corrupt or truncated file is recomputed with a warning.

The vectors live on disk: ``prepare`` only writes the missing files, and ``rows`` reads an
image's file when asked, keeping recently read images in an LRU within a memory budget
(``window_features.memory_budget``), so RAM does not grow with the dataset (issue 10).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from spp_detect.datasets.records import ImageRecord
from spp_detect.proposals.cache import read_image_bytes
from spp_detect.serialization import load_file, save_file
from spp_detect.training.conv_cache import record_image, weights_digest
from spp_detect.training.window_features import memory_budget
from spp_detect.utils import bytes_digest, null_timer

__all__ = ["CACHE_VERSION", "RCNNWindowFeatures"]

logger = logging.getLogger(__name__)

# Bump when the meaning or layout of a cached file changes: every older file is recomputed.
CACHE_VERSION = 2


class RCNNWindowFeatures:
    """Pooled features of the training windows of each image (R-CNN).

    The backbone's weights are hashed once, when the object is made.

    Args:
        detector: the ``RCNNDetector`` being trained.
        cache_dir: folder of ``<image_id>.pt`` files.
        dtype: storage dtype of the pooled vectors.
        memory_bytes: budget of the images' vectors kept in memory after a read (an LRU; None:
            ``memory_budget()``); the others are read from disk again when needed.
    """

    def __init__(
        self,
        detector,
        cache_dir: Path,
        dtype: str = "float16",
        memory_bytes: Optional[int] = None,
    ) -> None:
        self.detector = detector
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = getattr(torch, dtype)
        m = detector.config.model
        self._key_fields: Dict[str, Any] = dict(
            version=CACHE_VERSION,
            backbone=detector.backbone.name,
            backbone_kwargs=m.backbone_kwargs,
            weights=weights_digest(detector.backbone),
            context_pad=int(m.context_pad),
            warp_size=int(detector.warp_size),
            levels=list(m.levels),
            dtype=dtype,
        )
        self.memory_bytes = memory_budget() if memory_bytes is None else int(memory_bytes)
        self.images: Sequence = []
        self._keys: List[str] = []
        self._lru: "OrderedDict[int, Tensor]" = OrderedDict()
        self._lru_bytes = 0

    def _key(self, record: ImageRecord, data: bytes, windows: Tensor) -> str:
        """Key of the pooled ``windows`` of ``record``, whose file's bytes are ``data``."""
        coords = np.ascontiguousarray(windows.detach().cpu().numpy(), dtype=np.float32)
        fields = dict(
            image=bytes_digest(data),
            flipped=record.flipped,
            windows=bytes_digest(coords.tobytes()),
            **self._key_fields,
        )
        return json.dumps(fields, sort_keys=True, default=str)

    def _load(self, path: Path, key: str, num_windows: int) -> Optional[Tensor]:
        """The cached vectors if the file is readable and holds ``key`` (a corrupt, truncated
        or malformed file is logged as a warning and ``None`` returned)."""
        if not path.is_file():
            return None
        try:
            data = load_file(path, what="R-CNN feature cache file")
        except Exception as e:  # noqa: BLE001 - torch raises many types on a damaged file
            logger.warning("%s: unreadable R-CNN feature cache file, recomputing (%s)", path, e)
            return None
        try:
            if not isinstance(data, dict) or not isinstance(data.get("key"), str):
                raise ValueError("not an R-CNN feature cache entry")
            if data["key"] != key:
                return None
            pooled = data["pooled"]
            want = (num_windows, self.detector.pooled_dim)
            if not isinstance(pooled, Tensor) or tuple(pooled.shape) != want:
                raise ValueError(f"pooled features are not a {list(want)} tensor")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("%s: unreadable R-CNN feature cache file, recomputing (%s)", path, e)
            return None
        return pooled

    def _path(self, record: ImageRecord) -> Path:
        return self.cache_dir / f"{record.image_id}.pt"

    def _load_or_compute(
        self, record: ImageRecord, windows: Tensor, key: Optional[str] = None
    ) -> Tuple[Tensor, str]:
        """The vectors of ``windows`` of ``record`` and their key (``key`` given: the image's
        bytes are read only when the file must be recomputed)."""
        path = self._path(record)
        data = None
        if key is None:
            data = read_image_bytes(record.path)
            key = self._key(record, data, windows)
        pooled = self._load(path, key, windows.shape[0])
        if pooled is not None:
            return pooled, key
        if data is None:
            data = read_image_bytes(record.path)
            key = self._key(record, data, windows)  # the image may have changed since prepare
        det = self.detector
        with torch.no_grad():
            x = det.preprocess(record_image(record, data))
            pooled = det.pool_windows(x, windows.to(det.device), null_timer()).cpu()
        pooled = pooled.to(self.dtype)
        save_file({"key": key, "pooled": pooled}, path)
        return pooled, key

    def prepare(self, images) -> dict:
        """Pool every training window of every image (the expensive R-CNN pass), resumably;
        the vectors stay on disk (one image's at a time in memory)."""
        self.images = list(images)
        self._keys = []
        self._lru.clear()
        self._lru_bytes = 0
        disk = 0
        for im in tqdm(self.images, desc="R-CNN window features", unit="img", leave=False):
            _, key = self._load_or_compute(im.record, im.windows)
            self._keys.append(key)
            disk += self._path(im.record).stat().st_size
        logger.info("R-CNN feature cache %s: %.1f MB on disk", self.cache_dir, disk / 1e6)
        return {"images": len(self.images), "disk_bytes": disk}

    def _image_rows(self, i: int) -> Tensor:
        """Every window's vector of training image ``i`` (CPU, storage dtype): from the LRU,
        else read from disk (recomputed if the file was damaged since ``prepare``)."""
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        im = self.images[i]
        pooled, _ = self._load_or_compute(im.record, im.windows, self._keys[i])
        size = pooled.numel() * pooled.element_size()
        if size <= self.memory_bytes:
            self._lru[i] = pooled
            self._lru_bytes += size
            while self._lru_bytes > self.memory_bytes:
                _, old = self._lru.popitem(last=False)
                self._lru_bytes -= old.numel() * old.element_size()
        return pooled

    def rows(self, i: int, idx: Tensor, rng: Optional[np.random.Generator] = None) -> Tensor:
        """Pooled features ``Tensor[len(idx), D]`` of windows ``idx`` of training image ``i``
        (``rng`` unused: R-CNN has one scale)."""
        return self._image_rows(i)[idx.cpu()].to(self.detector.device, torch.float32)
