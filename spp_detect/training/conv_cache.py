"""On-disk cache of conv feature maps of training images (SPP-net's feature cache, sec. 4.1).

The conv layers are frozen during SPP-net training, so each image's conv5 map at each scale is
computed once and stored (float16 by default); fine-tuning, SVM training and box regression then
read maps instead of running the backbone again. One file per image holds all its scales,
written atomically, keyed by the backbone, its weights, the scales and the image file, so an
interrupted run resumes where it stopped and a changed setting recomputes.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from spp_detect.datasets.images import read_image
from spp_detect.datasets.records import ImageRecord
from spp_detect.utils import atomic_torch_save

__all__ = ["ConvFeatureCache", "weights_digest"]

logger = logging.getLogger(__name__)


def weights_digest(module: torch.nn.Module) -> str:
    """A short digest of a module's weights (so a cache built with other weights is not reused)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1)[:4096].float().numpy().tobytes())
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]


class ConvFeatureCache:
    """conv5 maps per training image, on disk, with an in-memory LRU on top.

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
        self._lru: "OrderedDict[str, Tuple[List[Tensor], List[float]]]" = OrderedDict()
        self._lru_bytes = 0
        m = detector.config.model
        self.settings_key = "|".join(
            [
                detector.backbone.name,
                weights_digest(detector.backbone),
                ",".join(map(str, m.scales)),
                str(m.max_size),
                dtype,
            ]
        )

    def _path(self, image_id: str) -> Path:
        return self.cache_dir / f"{image_id}.pt"

    def _image_key(self, record: ImageRecord) -> str:
        st = record.path.stat()
        return f"{self.settings_key}|{st.st_size}|{st.st_mtime_ns}"

    def _load(self, record: ImageRecord) -> Optional[Tuple[List[Tensor], List[float]]]:
        path = self._path(record.image_id)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a corrupt or partial file is recomputed
            logger.warning("%s: unreadable feature cache entry, recomputing", path)
            return None
        if data.get("key") != self._image_key(record):
            return None
        return list(data["maps"]), [float(f) for f in data["factors"].tolist()]

    def _compute(self, record: ImageRecord) -> Tuple[List[Tensor], List[float]]:
        det = self.detector
        image = read_image(record.path)
        with torch.no_grad():
            x = det.preprocess(image)
            maps = [m.to("cpu", self.dtype) for m in det.conv_maps(x)]
        factors = det.scale_factors(tuple(x.shape[-2:]))
        atomic_torch_save(
            {
                "key": self._image_key(record),
                "maps": maps,
                "factors": torch.tensor(factors, dtype=torch.float64),
            },
            self._path(record.image_id),
        )
        return maps, factors

    def get(self, record: ImageRecord) -> Tuple[List[Tensor], List[float]]:
        """The maps (``Tensor[C, h_s, w_s]`` per scale, CPU, cache dtype) and resize factors."""
        if record.image_id in self._lru:
            self._lru.move_to_end(record.image_id)
            return self._lru[record.image_id]
        entry = self._load(record) or self._compute(record)
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
        computed = reused = 0
        for rec in tqdm(records, desc="conv5 feature cache", unit="img", leave=False):
            if self._load(rec) is not None:
                reused += 1
                continue
            self._compute(rec)
            computed += 1
        disk = sum(self._path(r.image_id).stat().st_size for r in records)
        logger.info(
            "feature cache %s: %d images (%d computed, %d reused), %.1f MB on disk",
            self.cache_dir,
            len(records),
            computed,
            reused,
            disk / 1e6,
        )
        return {"images": len(records), "computed": computed, "reused": reused, "disk_bytes": disk}
