"""Pooled window features of training images for the R-CNN baseline, cached on disk.

R-CNN runs the whole backbone per window, so its training cache holds every window's pooled
vector (R-CNN's feature cache; the paper's 200 GB on VOC07 against SPP-net's 20 GB of conv
maps). One file per image, written atomically and keyed by the windows and the weights.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from spp_detect.datasets.images import read_image
from spp_detect.datasets.records import ImageRecord
from spp_detect.utils import atomic_torch_save, null_timer
from spp_detect.training.conv_cache import weights_digest

__all__ = ["RCNNWindowFeatures"]

logger = logging.getLogger(__name__)


class RCNNWindowFeatures:
    """Pooled features of the training windows of each image (R-CNN).

    Args:
        detector: the ``RCNNDetector`` being trained.
        cache_dir: folder of ``<image_id>.pt`` files.
        dtype: storage dtype of the pooled vectors.
    """

    def __init__(self, detector, cache_dir: Path, dtype: str = "float16") -> None:
        self.detector = detector
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = getattr(torch, dtype)
        self.weights = weights_digest(detector.backbone)
        self.images: Sequence = []
        self._pooled: Dict[int, Tensor] = {}

    def _key(self, record: ImageRecord, windows: Tensor) -> str:
        coords = np.round(windows.detach().cpu().double().numpy() * 16).astype(np.int64)
        h = hashlib.sha1(coords.tobytes()).hexdigest()[:16]
        st = record.path.stat()
        m = self.detector.config.model
        return f"{self.weights}|{m.context_pad}|{st.st_size}|{st.st_mtime_ns}|{h}"

    def _load_or_compute(self, record: ImageRecord, windows: Tensor) -> Tensor:
        path = self.cache_dir / f"{record.image_id}.pt"
        key = self._key(record, windows)
        if path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                if data.get("key") == key:
                    return data["pooled"]
            except Exception:  # noqa: BLE001 - a corrupt or partial file is recomputed
                logger.warning("%s: unreadable R-CNN feature cache entry, recomputing", path)
        det = self.detector
        with torch.no_grad():
            x = det.preprocess(read_image(record.path))
            pooled = det.pool_windows(x, windows.to(det.device), null_timer()).cpu()
        pooled = pooled.to(self.dtype)
        atomic_torch_save({"key": key, "pooled": pooled}, path)
        return pooled

    def prepare(self, images) -> dict:
        """Pool every training window of every image (the expensive R-CNN pass), resumably."""
        self.images = list(images)
        disk = 0
        for i, im in enumerate(
            tqdm(self.images, desc="R-CNN window features", unit="img", leave=False)
        ):
            self._pooled[i] = self._load_or_compute(im.record, im.windows)
            disk += (self.cache_dir / f"{im.record.image_id}.pt").stat().st_size
        logger.info("R-CNN feature cache %s: %.1f MB on disk", self.cache_dir, disk / 1e6)
        return {"images": len(self.images), "disk_bytes": disk}

    def rows(self, i: int, idx: Tensor, rng: Optional[np.random.Generator] = None) -> Tensor:
        """Pooled features ``Tensor[len(idx), D]`` of windows ``idx`` of training image ``i``
        (``rng`` unused: R-CNN has one scale)."""
        return self._pooled[i][idx.cpu()].to(self.detector.device, torch.float32)
