"""Pooled window features of training images, for both detectors.

Training reads window features many times (fine-tuning draws mini-batches, SVM mining and box
regression make a pass each), so each method gets a source that avoids repeating its expensive
part: SPP-net keeps each image's conv maps (``ConvFeatureCache``) and pools windows from them;
the R-CNN baseline (``spp_detect.training.rcnn_features``) caches each window's pooled vector.

Both sources share one interface, indexed by the training images given to ``prepare``:
``rows(i, idx, rng=None) -> Tensor[len(idx), D]``, the pooled features of windows ``idx`` of
image ``i`` (float32, on the detector's device).

Memory stays bounded as the dataset grows (issue 10): what is held in RAM is capped by a budget
(``memory_budget``: ``DetectorConfig.memory_budget_mb``, by default a quarter of the RAM
available), and beyond it the features are recomputed or read from disk with the same values.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from spp_detect import distributed as dist
from spp_detect.modeling.pyramid import random_scales
from spp_detect.training.conv_cache import ConvFeatureCache

__all__ = ["SPPWindowFeatures", "available_memory", "memory_budget", "all_rows"]

logger = logging.getLogger(__name__)

# Share of the available RAM that training's in-memory features may use by default: the rest is
# left to the conv-map LRU, the SVM caches and regression samples (each capped on its own), and
# the other processes of the machine.
_DEFAULT_RAM_FRACTION = 0.25


def available_memory() -> int:
    """Bytes of RAM available to new allocations (``MemAvailable`` of ``/proc/meminfo``; where
    that file is missing, the physical memory from ``sysconf``)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_budget(budget_mb: int = 0) -> int:
    """Bytes that training's in-memory window features may use: ``budget_mb`` MB when
    positive (``DetectorConfig.memory_budget_mb``), else a quarter of the available RAM.

    Under torchrun that is the machine's budget, shared by its ``LOCAL_WORLD_SIZE`` ranks:
    every rank fine-tunes on the whole training set and so holds its own copy of the pooled
    windows, and each takes an equal part (values are the same either way; see
    ``SPPWindowFeatures``)."""
    if budget_mb < 0:
        raise ValueError(f"memory_budget_mb must be >= 0, got {budget_mb}")
    total = int(budget_mb) << 20 if budget_mb else int(available_memory() * _DEFAULT_RAM_FRACTION)
    return total // dist.local_world_size()


class SPPWindowFeatures:
    """Pooled features of the training windows, from cached conv maps.

    With one scale (or ``random_scale`` off) every window always pools the same cells, so when
    all images' pooled windows fit in ``memory_bytes`` they are pooled once and kept in memory
    (float16); training then never pools the same window twice. Otherwise windows are pooled
    from the cached float16 maps on demand (multi-scale training draws a random scale per
    window, as the SPP_net code does). Both paths round the pooled features to float16, so the
    budget changes speed and memory only, never a value.

    Args:
        detector: the ``SPPDetector`` being trained.
        cache: its ``ConvFeatureCache``.
        random_scale: multi-scale training picks a random scale per window.
        memory_bytes: budget of the in-memory pooled windows (None: ``memory_budget()``).
    """

    def __init__(
        self,
        detector,
        cache: ConvFeatureCache,
        random_scale: bool = True,
        memory_bytes: Optional[int] = None,
    ) -> None:
        self.detector = detector
        self.cache = cache
        self.random_scale = bool(random_scale) and len(detector.config.model.scales) > 1
        self.memory_bytes = memory_budget() if memory_bytes is None else int(memory_bytes)
        self.images: Sequence = []
        self._pooled: Dict[int, Tensor] = {}

    def prepare(self, images) -> dict:
        """Fill the conv cache for ``images`` (``TrainingImage`` list), pool every window once
        when it fits in memory; returns the cache statistics."""
        self.images = list(images)
        stats = self.cache.build([im.record for im in self.images])
        total = sum(im.windows.shape[0] for im in self.images) * self.detector.pooled_dim * 2
        stats["pooled_in_memory"] = (not self.random_scale) and total <= self.memory_bytes
        stats["pooled_bytes"] = total
        stats["memory_budget_bytes"] = self.memory_bytes
        self._pooled = {}
        if stats["pooled_in_memory"]:
            for i in tqdm(range(len(self.images)), desc="pool windows", unit="img", leave=False):
                idx = torch.arange(self.images[i].windows.shape[0])
                self._pooled[i] = self._pool(i, idx).to("cpu", torch.float16)
            logger.info(
                "pooled %d windows once, %.1f MB in memory",
                sum(im.windows.shape[0] for im in self.images),
                total / 1e6,
            )
        else:
            logger.info(
                "pooling windows from the conv cache on demand (%.1f MB of pooled windows, "
                "budget %.1f MB%s)",
                total / 1e6,
                self.memory_bytes / 1e6,
                ", random scale per window" if self.random_scale else "",
            )
        return stats

    @property
    def on_demand_pool_windows(self) -> int:
        """How many pooled windows a fine-tuning pool may hold at once when windows are pooled
        on demand (the budget over a float32 row plus its copy); 0 when they are in memory."""
        if self._pooled or not self.images:
            return 0
        return self.memory_bytes // (self.detector.pooled_dim * 4 * 2)

    def _pool(self, i: int, idx: Tensor, rng: Optional[np.random.Generator] = None) -> Tensor:
        im = self.images[i]
        device = self.detector.device
        maps, factors = self.cache.get(im.record)
        maps = [m.to(device=device, dtype=torch.float32) for m in maps]
        windows = im.windows[idx].to(device)
        scale_idx = None
        if rng is not None and self.random_scale:
            scale_idx = random_scales(windows.shape[0], len(maps), rng)
        with torch.no_grad():
            pooled, inverse = self.detector.pool_from_maps(maps, factors, windows, scale_idx)
        # Rounded to float16 as the in-memory store is, so both paths give the same values.
        return pooled[inverse].to(torch.float16).to(torch.float32)

    def rows(self, i: int, idx: Tensor, rng: Optional[np.random.Generator] = None) -> Tensor:
        """Pooled features ``Tensor[len(idx), D]`` of windows ``idx`` of training image ``i``.

        ``rng`` given (fine-tuning) draws a random scale per window in multi-scale training;
        ``None`` uses the test-time rule (area closest to 224^2, sec. 4.1).
        """
        if i in self._pooled:
            return self._pooled[i][idx.cpu()].to(self.detector.device, torch.float32)
        return self._pool(i, idx, rng)


def all_rows(source, i: int) -> Tensor:
    """Every window of training image ``i`` (test-time scale rule)."""
    return source.rows(i, torch.arange(source.images[i].windows.shape[0]))
