"""Pooled window features of training images for the R-CNN baseline, cached on disk.

R-CNN runs the whole backbone per window, so its training cache holds every window's pooled
vector (R-CNN's feature cache; the paper's 200 GB on VOC07 against SPP-net's 20 GB of conv
maps). One file per image, written atomically and keyed by the windows and the weights.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..datasets.images import read_image
from ..datasets.records import ImageRecord
from ..utils import atomic_torch_save, null_timer
from .features import weights_digest

__all__ = ["RCNNWindowFeatures"]

logger = logging.getLogger(__name__)


def _window_keys(windows: Tensor) -> np.ndarray:
    # Windows are matched by their coordinates rounded to 1/16 pixel.
    return np.round(windows.detach().cpu().double().numpy() * 16).astype(np.int64)


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
        self._index: Dict[str, Tuple[Dict[tuple, int], Tensor]] = {}

    def _key(self, record: ImageRecord, windows: Tensor) -> str:
        h = hashlib.sha1(_window_keys(windows).tobytes()).hexdigest()[:16]
        st = record.path.stat()
        m = self.detector.config.model
        return f"{self.weights}|{m.context_pad}|{st.st_size}|{st.st_mtime_ns}|{h}"

    def _compute(self, record: ImageRecord, windows: Tensor) -> Tensor:
        det = self.detector
        image = read_image(record.path)
        with torch.no_grad():
            x = det.preprocess(image)
            return det.pool_windows(x, windows.to(det.device), null_timer()).cpu()

    def _entry(self, record: ImageRecord, windows: Tensor) -> Tuple[Dict[tuple, int], Tensor]:
        path = self.cache_dir / f"{record.image_id}.pt"
        key = self._key(record, windows)
        data = None
        if path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a corrupt or partial file is recomputed
                logger.warning("%s: unreadable R-CNN feature cache entry, recomputing", path)
        if data is None or data.get("key") != key:
            pooled = self._compute(record, windows).to(self.dtype)
            atomic_torch_save({"key": key, "windows": windows.cpu(), "pooled": pooled}, path)
            data = {"windows": windows.cpu(), "pooled": pooled}
        lookup = {tuple(k): i for i, k in enumerate(_window_keys(data["windows"]))}
        return lookup, data["pooled"]

    def prepare(self, images) -> dict:
        """Pool every training window of every image (the expensive R-CNN pass), resumably."""
        disk = 0
        for im in tqdm(images, desc="R-CNN window features", unit="img", leave=False):
            self._index[im.record.image_id] = self._entry(im.record, im.windows)
            disk += (self.cache_dir / f"{im.record.image_id}.pt").stat().st_size
        logger.info("R-CNN feature cache %s: %.1f MB on disk", self.cache_dir, disk / 1e6)
        return {"images": len(images), "disk_bytes": disk}

    def pooled(
        self, record: ImageRecord, windows: Tensor, rng: Optional[np.random.Generator] = None
    ) -> Tuple[Tensor, Tensor]:
        """Pooled features of windows of a prepared image (``rng`` unused: one scale).

        Returns:
            pooled (Tensor[R, D]) float32 on the detector's device and inverse = arange(R).
        """
        device = self.detector.device
        if record.image_id not in self._index:
            raise ValueError(f"{record.image_id}: image was not prepared")
        lookup, pooled = self._index[record.image_id]
        try:
            rows = [lookup[tuple(k)] for k in _window_keys(windows)]
        except KeyError:
            raise ValueError(f"{record.image_id}: window not among the prepared ones") from None
        out = pooled[torch.as_tensor(rows, dtype=torch.long)].to(device, torch.float32)
        return out, torch.arange(windows.shape[0], device=device)
