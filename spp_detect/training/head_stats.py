"""The response statistics of the fine-tuned fc6 and fc7 that ``test.svd_method="responses"``
needs (``modeling/lowrank.py``): mean and leading principal directions of each layer's responses
(before ReLU) on a sample of training windows, measured once after fine-tuning and saved in the
model (a few MB beside fc6's weights)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Sequence

import numpy as np
import torch
from tqdm import tqdm

from spp_detect.modeling.lowrank import ResponseMoments

__all__ = ["head_response_stats", "MAX_SAVED_RANK"]

logger = logging.getLogger(__name__)

# Directions saved per layer: Fast R-CNN's largest rank (1024) and more than any test-time cut
# needs; 4096 x 1024 float32 is 16 MB per layer.
MAX_SAVED_RANK = 1024


@torch.no_grad()
def head_response_stats(
    head,
    source,
    images: Sequence[Any],
    num_images: int = 100,
    windows_per_image: int = 100,
    seed: int = 0,
) -> Dict[str, Any]:
    """Mean and principal directions of fc6's and fc7's responses.

    Args:
        head: the fine-tuned ``FCHead`` (not changed; no dropout).
        source: the training window features (``rows(i, idx) -> Tensor[len(idx), D]``).
        images: the training images (``TrainingImage``; their windows are sampled).
        num_images: images sampled, spread evenly over the set.
        windows_per_image: windows drawn at random from each (ground truths and proposals).
        seed: the draws' seed.
    Returns:
        ``{"fc6": stats, "fc7": stats, "windows": N}`` with ``ResponseMoments.finalize``'s
        entries (float32 ``mean``, ``basis [hidden, r]``, ``eigenvalues [r]``).
    """
    rng = np.random.default_rng(seed)
    picks = np.unique(np.linspace(0, len(images) - 1, min(num_images, len(images))).round())
    moments = {name: ResponseMoments(head.hidden) for name in ("fc6", "fc7")}
    for i in tqdm(picks.astype(int).tolist(), desc="fc response statistics", unit="img",
                  leave=False):  # fmt: skip
        n = int(images[i].windows.shape[0])
        if n == 0:
            continue
        idx = torch.from_numpy(rng.choice(n, size=min(n, windows_per_image), replace=False))
        x = source.rows(i, idx.long()).float() * head.input_scale
        y6 = head.fc6(x)
        y7 = head.fc7(torch.relu(y6))
        moments["fc6"].update(y6)
        moments["fc7"].update(y7)
    if moments["fc6"].count < 2:
        raise ValueError("fc response statistics: the training images have no windows")
    stats: Dict[str, Any] = {k: m.finalize(MAX_SAVED_RANK) for k, m in moments.items()}
    stats["windows"] = moments["fc6"].count
    for name in ("fc6", "fc7"):
        ev = stats[name]["eigenvalues"].double()
        total = stats[name]["total_variance"] or 1.0
        kept = {r: float(ev[:r].sum()) / total for r in (64, 256, 1024) if r <= ev.numel()}
        logger.info(
            "%s responses on %d windows: share of their variance in the top k directions: %s",
            name,
            stats["windows"],
            ", ".join(f"k={r} {v:.3f}" for r, v in kept.items()),
        )
    return stats
