"""Training caches filled by every rank of a ``torchrun`` job, each its shard of the images.

The first two training stages are per image and independent (SPP-net sec. 4.1: proposals, then
conv5 maps; R-CNN: pooled windows), so K ranks over one shared ``cache_dir`` finish them about K
times sooner. ``train_detector`` then finds every entry cached. The entries are the very ones
``train_detector`` would write: same seed, same detector, same keys (a mismatch would only cost
recomputation, never a wrong feature, since every entry is keyed on its inputs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch

from spp_detect import distributed as dist
from spp_detect.config import DetectorConfig
from spp_detect.inference.dataset import dataset_proposals
from spp_detect.modeling.build import build_detector
from spp_detect.training.train import make_feature_source, training_images
from spp_detect.utils import resolve_device

__all__ = ["fill_caches_by_rank"]

logger = logging.getLogger(__name__)


def fill_caches_by_rank(
    dataset,
    config: DetectorConfig,
    method: str,
    cache_dir: Union[str, Path],
    device: Optional[str] = None,
    pretrained: Union[bool, str] = True,
    proposals_file: Optional[Union[str, Path]] = None,
) -> None:
    """Proposals and feature caches of this rank's shard of ``dataset``; returns when every
    rank has finished (an error on one rank is raised on all). One process: the whole split.

    Args:
        dataset: the training split (``VOCDataset`` or ``COCODataset``).
        cache_dir: the cache folder ``train_detector`` will use (shared by the ranks).
        device, pretrained, proposals_file: as given to ``train_detector``.
    """
    cache_dir = Path(cache_dir)
    # Sharded, then every rank loads all (windows of the shard only are needed here).
    proposals = dataset_proposals(dataset, config, cache_dir, proposals_file)
    with dist.all_ranks_ok("feature cache"):
        torch.manual_seed(config.finetune.seed)  # as train_detector: the same initial weights
        dev = resolve_device(device)
        detector = build_detector(method, dataset.class_names, config, pretrained=pretrained)
        source = make_feature_source(detector.to(dev), cache_dir)
        mine = dist.shard(dataset.records)
        images, flipped = training_images(mine, proposals, config)
        if method == "spp":
            stats = source.cache.build([im.record for im in images + flipped])
        else:
            stats = source.prepare(images + flipped)
        logger.info(
            "rank %d: feature cache of %d of %d images filled (%s)",
            dist.rank(), len(mine), len(dataset), stats,
        )  # fmt: skip
