"""On-disk cache of conv feature maps of training images (SPP-net's feature cache, sec. 4.1).

The conv layers are frozen during SPP-net training, so each image's conv5 map at each scale is
computed once and stored (float16 by default); fine-tuning, SVM training and box regression then
read maps instead of running the backbone again. One file per image holds all its scales,
written atomically (``serialization.save_file``: temporary file, fsync, rename) and keyed by
everything that determines the maps: the backbone and all of its weights, the scales, the size
cap, the storage dtype, the image file's bytes (and whether the record is its mirror) and
``CACHE_VERSION``. An interrupted run resumes where it stopped, a changed input recomputes, and
a corrupt or truncated file is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from spp_detect.datasets.images import decode_image
from spp_detect.datasets.records import ImageRecord
from spp_detect.proposals.cache import read_image_bytes
from spp_detect.serialization import load_file, save_file
from spp_detect.utils import bytes_digest

__all__ = ["CACHE_VERSION", "ConvFeatureCache", "record_image", "weights_digest"]

logger = logging.getLogger(__name__)

# Bump when the meaning or layout of a cached file changes: every older file is recomputed.
CACHE_VERSION = 2

Entry = Tuple[List[Tensor], List[float]]


def weights_digest(module: torch.nn.Module) -> str:
    """BLAKE2b digest of every value of every tensor in ``module.state_dict()`` (with names,
    dtypes and shapes), so that a cache built with other weights is never reused."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())  # the exact bytes, whatever the dtype
    return h.hexdigest()


def record_image(record: ImageRecord, data: bytes) -> np.ndarray:
    """The image of ``record`` (np.ndarray[H, W, 3] uint8 RGB) from its file's bytes ``data``,
    mirrored horizontally for a ``flipped`` record (``ImageRecord.mirrored``)."""
    image = decode_image(data, record.path)
    return np.ascontiguousarray(image[:, ::-1]) if record.flipped else image


class ConvFeatureCache:
    """conv5 maps per training image, on disk, with an in-memory LRU on top.

    The backbone's weights are hashed once, when the cache object is made: build a new
    ``ConvFeatureCache`` after changing them.

    Args:
        cache_dir: folder of ``<image_id>.pt`` files.
        detector: an ``SPPDetector`` (its backbone, scales and ``conv_maps`` are used).
        dtype: storage dtype (``"float16"``: half the disk of float32, the precision of SPP_net's
            cache is not needed for max pooling).
        memory_bytes: the in-memory LRU budget.
    """

    def __init__(
        self,
        cache_dir: Path,
        detector,
        dtype: str = "float16",
        memory_bytes: int = 2 << 30,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.detector = detector
        self.dtype = getattr(torch, dtype)
        self.memory_bytes = int(memory_bytes)
        self._lru: "OrderedDict[str, Entry]" = OrderedDict()
        self._lru_bytes = 0
        m = detector.config.model
        self.num_scales = len(m.scales)
        self._key_fields: Dict[str, Any] = dict(
            version=CACHE_VERSION,
            backbone=detector.backbone.name,
            backbone_kwargs=m.backbone_kwargs,
            weights=weights_digest(detector.backbone),
            scales=list(m.scales),
            max_size=int(m.max_size),
            dtype=dtype,
        )

    def _path(self, image_id: str) -> Path:
        return self.cache_dir / f"{image_id}.pt"

    def _key(self, record: ImageRecord, data: bytes) -> str:
        """The key of the maps of ``record``, whose file's bytes are ``data``."""
        fields = dict(image=bytes_digest(data), flipped=record.flipped, **self._key_fields)
        return json.dumps(fields, sort_keys=True, default=str)

    def _load(self, record: ImageRecord, key: str) -> Optional[Entry]:
        """The cached entry if its file exists, is readable and holds ``key``; else ``None``
        (a corrupt, truncated or malformed file is logged as a warning)."""
        path = self._path(record.image_id)
        if not path.is_file():
            return None
        try:
            data = load_file(path, what="feature cache file")
        except Exception as e:  # noqa: BLE001 - torch raises many types on a damaged file
            logger.warning("%s: unreadable feature cache file, recomputing (%s)", path, e)
            return None
        try:
            if not isinstance(data, dict) or not isinstance(data.get("key"), str):
                raise ValueError("not a feature cache entry")
            if data["key"] != key:
                logger.debug("%s: stale (image, weights or settings changed), recomputing", path)
                return None
            maps, factors = list(data["maps"]), [float(f) for f in data["factors"].tolist()]
            if len(maps) != self.num_scales or len(factors) != self.num_scales:
                raise ValueError(f"{len(maps)} maps for {self.num_scales} scales")
            if any(not isinstance(m, Tensor) or m.ndim != 3 or m.dtype != self.dtype for m in maps):
                raise ValueError("maps are not [C, h, w] tensors of the cache dtype")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("%s: unreadable feature cache file, recomputing (%s)", path, e)
            return None
        return maps, factors

    def _compute(self, record: ImageRecord, data: bytes, key: str) -> Entry:
        det = self.detector
        image = record_image(record, data)
        with torch.no_grad():
            x = det.preprocess(image)
            maps = [m.to("cpu", self.dtype) for m in det.conv_maps(x)]
        factors = det.scale_factors(tuple(x.shape[-2:]))
        entry = {"key": key, "maps": maps, "factors": torch.tensor(factors, dtype=torch.float64)}
        save_file(entry, self._path(record.image_id))
        return maps, factors

    def _load_or_compute(self, record: ImageRecord) -> Tuple[Entry, bool]:
        """The entry of ``record`` and whether it had to be computed."""
        data = read_image_bytes(record.path)
        key = self._key(record, data)
        entry = self._load(record, key)
        if entry is not None:
            return entry, False
        return self._compute(record, data, key), True

    def get(self, record: ImageRecord) -> Entry:
        """The maps (``Tensor[C, h_s, w_s]`` per scale, CPU, cache dtype) and resize factors."""
        if record.image_id in self._lru:
            self._lru.move_to_end(record.image_id)
            return self._lru[record.image_id]
        entry, _ = self._load_or_compute(record)
        size = sum(m.numel() * m.element_size() for m in entry[0])
        if size <= self.memory_bytes:
            self._lru[record.image_id] = entry
            self._lru_bytes += size
            while self._lru_bytes > self.memory_bytes:
                _, (old, _) = self._lru.popitem(last=False)
                self._lru_bytes -= sum(m.numel() * m.element_size() for m in old)
        return entry

    def build(self, records: Sequence[ImageRecord]) -> Dict[str, float]:
        """Fill the cache for every record (resumable) and report its size.

        Returns:
            ``{"images", "computed", "reused", "disk_bytes"}``.
        """
        computed = 0
        for rec in tqdm(records, desc="conv5 feature cache", unit="img", leave=False):
            computed += self._load_or_compute(rec)[1]
        disk = sum(self._path(r.image_id).stat().st_size for r in records)
        logger.info(
            "feature cache %s: %d images (%d computed, %d reused), %.1f MB on disk",
            self.cache_dir,
            len(records),
            computed,
            len(records) - computed,
            disk / 1e6,
        )
        return {
            "images": len(records),
            "computed": computed,
            "reused": len(records) - computed,
            "disk_bytes": disk,
        }
