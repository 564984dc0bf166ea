"""Fair timing of detectors (timm ``benchmark.py`` style): the same images and the same windows
for every method, a warm-up per method, a device sync before each clock read (``StageTimer``),
per-stage seconds per image, and medians over images.

The methods take turns on each image, so that a load change on a shared machine hits all of
them alike. Selective search runs once per image, timed on its own: its wall time is the
``proposals`` stage of every method.

R-CNN runs the whole backbone on every window: minutes per image on a CPU. ``capped_windows``
runs R-CNN's per-window network (crop_warp, conv, pool, in chunks of ``crop_batch``) on the
first K distinct windows of an image and scales those stages linearly to the full count; fc,
classify, box regression and NMS still run on every window (the K features repeated), so they
are measured, not extrapolated. Linear scaling is fair when K is a multiple of ``crop_batch``
(64): every chunk then does the same work.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchvision.ops import clip_boxes_to_image
from tqdm import tqdm

from spp_detect.modeling.base import WindowDetector
from spp_detect.modeling.rcnn import RCNNDetector
from spp_detect.proposals.cache import ProposalCache
from spp_detect.proposals.selective_search import selective_search
from spp_detect.proposals.settings import ProposalSettings
from spp_detect.structures import Detections, unique_boxes
from spp_detect.utils import StageTimer

__all__ = [
    "time_proposals",
    "capped_windows",
    "benchmark_detectors",
    "summarize_method",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def time_proposals(
    records: Sequence[Any],
    images: Sequence[np.ndarray],
    settings: ProposalSettings,
    cache_dir: Optional[PathLike],
) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """Selective search once per image with ``settings``, timed; the windows are cached.

    Each image is segmented once, in this process, and its wall time is the ``proposals``
    stage of every method. The windows go to the ``ProposalCache`` at ``cache_dir`` (keyed by
    ``settings``, the cache the other tools read); where that cache already holds this image's
    windows, those are used (the same windows: selective search is seeded).

    Args:
        records: dataset records (``image_id``, ``path``: the cache key fingerprints the file,
            as every other tool's proposal cache does).
        images: RGB uint8 ``[H, W, 3]``, the records' images.
    Returns:
        ``{image_id: np.ndarray[R, 4] float32}`` (xyxy in image pixels) and
        ``{image_id: seconds}``.
    """
    cache = ProposalCache(cache_dir, settings) if cache_dir is not None else None
    boxes: Dict[str, np.ndarray] = {}
    seconds: Dict[str, float] = {}
    for rec, image in tqdm(
        list(zip(records, images)), desc="proposals (timed)", unit="img", leave=False
    ):
        t0 = time.perf_counter()
        fresh = selective_search(image, settings)
        seconds[rec.image_id] = time.perf_counter() - t0
        boxes[rec.image_id] = fresh if cache is None else _through_cache(cache, rec, fresh)
    return boxes, seconds


def _through_cache(cache: ProposalCache, record: Any, fresh: np.ndarray) -> np.ndarray:
    """The cached windows of ``record``'s image where present (else ``fresh``, then stored)."""
    image_id = record.image_id
    key = cache.key(image_id, path=record.path)
    cached = cache.load(image_id, key)
    if cached is None:
        cache.save(image_id, key, fresh)
        return fresh
    if cached.shape != fresh.shape or not np.array_equal(cached, fresh):
        logger.warning(
            "%s: cached proposals differ from a fresh run; using the cached ones "
            "(shared with the other tools)",
            image_id,
        )
    return cached


def _valid_windows(proposals: np.ndarray, image_hw: Tuple[int, int]) -> np.ndarray:
    """The windows ``detect`` keeps (clipped to the image, positive area), in their order."""
    w = torch.as_tensor(np.asarray(proposals), dtype=torch.float32).reshape(-1, 4)
    w = clip_boxes_to_image(w, image_hw)
    keep = (w[:, 2] > w[:, 0]) & (w[:, 3] > w[:, 1])
    return w[keep].numpy()


@contextmanager
def capped_windows(detector: RCNNDetector, max_windows: int) -> Iterator[Dict[str, Any]]:
    """Within the block, ``detector.detect`` runs the per-window network (R-CNN's crop_warp,
    conv, pool) on the first ``max_windows`` distinct windows only and charges those stages
    ``U / K`` times their measured time (U distinct windows, K measured); their features are
    repeated to all U windows, so fc, classify, bbox_reg and NMS run, and are timed, on the
    full count. The detections are meaningless. Yields a dict that each ``detect`` fills with
    ``unique_windows``, ``measured_windows``, ``scale`` and ``measured`` (the raw K-window
    seconds of the scaled stages). The detector is restored on exit.
    """
    if not isinstance(detector, RCNNDetector):
        raise ValueError(
            f"a window cap only applies to R-CNN (per-window conv), not {detector.method!r}"
        )
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    original = detector.compute_pooled
    record: Dict[str, Any] = {}

    def compute_pooled(image: torch.Tensor, windows: torch.Tensor, timer: StageTimer):
        # R-CNN's own deduplication (identical pixels, identical features) gives U.
        keep, inverse = unique_boxes(windows)
        u = int(keep.numel())
        k = min(max_windows, u)
        sub = StageTimer(timer.device)
        pooled, _ = original(image, windows[keep[:k]], sub)
        raw = sub.reset()
        scale = u / k
        for stage, sec in raw.items():
            timer.times[stage] += sec * scale
        record.update(unique_windows=u, measured_windows=k, scale=scale, measured=raw)
        return pooled[torch.arange(u, device=pooled.device) % k], inverse

    # An instance attribute shadows the class method for this block only.
    detector.compute_pooled = compute_pooled
    try:
        yield record
    finally:
        del detector.compute_pooled


def _image_record(
    image_id: str, windows: int, proposal_seconds: float, times: Dict[str, float], capped: Dict
) -> Dict[str, Any]:
    """One method's figures on one image (see ``benchmark_detectors``)."""
    return {
        "image_id": image_id,
        "windows": windows,
        "unique_windows": capped.get("unique_windows"),
        "measured_windows": capped.get("measured_windows", windows),
        "scale": capped.get("scale", 1.0),
        "extrapolated_stages": sorted(capped.get("measured", {})),
        "stages": {"proposals": float(proposal_seconds), **times},
        "measured_stages": {**times, **capped.get("measured", {})},
        "total": sum(times.values()),
    }


def benchmark_detectors(
    detectors: Dict[str, WindowDetector],
    image_ids: Sequence[str],
    images: Sequence[np.ndarray],
    proposals: Dict[str, np.ndarray],
    proposal_seconds: Dict[str, float],
    device: torch.device,
    warmup: int = 1,
    max_windows: Optional[Dict[str, int]] = None,
) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, Dict[str, Detections]]]:
    """Per-image, per-stage times of every detector on the same images and windows.

    Args:
        detectors: ``{method: detector}``, in eval mode.
        images: RGB uint8 ``[H, W, 3]``, one per id.
        proposals: ``{image_id: [R, 4]}`` xyxy in image pixels, the same for every method.
        proposal_seconds: the timed selective search of each image (the ``proposals`` stage).
        warmup: untimed ``detect`` calls on the first image, per method, before timing.
        max_windows: ``{method: K}`` for R-CNN detectors: see ``capped_windows``.
    Returns:
        ``{method: [per-image record]}`` with ``image_id``, ``windows`` (R, after clipping),
        ``unique_windows``, ``measured_windows``, ``scale``, ``stages`` (seconds, extrapolated
        where scaled, plus ``proposals``), ``measured_stages`` (as measured) and ``total``
        (the sum of ``stages`` without proposals); and ``{method: {image_id: Detections}}``
        from the timed runs.
    """
    caps = {m: int(k) for m, k in (max_windows or {}).items() if k}
    windows = {
        i: _valid_windows(proposals[i], tuple(im.shape[:2])) for i, im in zip(image_ids, images)
    }

    def run(method: str, image: np.ndarray, image_id: str, timer: StageTimer):
        det = detectors[method]
        if method not in caps:
            return det.detect(image, windows[image_id], timer), {}
        with capped_windows(det, caps[method]) as capped:
            return det.detect(image, windows[image_id], timer), capped

    with torch.no_grad():
        for method in detectors if images else ():
            for _ in range(warmup):
                run(method, images[0], image_ids[0], StageTimer(device))
        per_image: Dict[str, List[Dict[str, Any]]] = {m: [] for m in detectors}
        dets: Dict[str, Dict[str, Detections]] = {m: {} for m in detectors}
        timer = StageTimer(device)
        for image_id, image in tqdm(
            list(zip(image_ids, images)), desc="timing", unit="img", leave=False
        ):
            for method in detectors:
                timer.reset()
                dets[method][image_id], capped = run(method, image, image_id, timer)
                n = len(windows[image_id])
                record = _image_record(
                    image_id, n, proposal_seconds[image_id], timer.reset(), capped
                )
                per_image[method].append(record)
    return per_image, dets


def summarize_method(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Medians over images: per stage, ``total`` (per-image sums without proposals) and
    ``total_with_proposals``; ``per_image`` keeps the records."""
    if not records:
        raise ValueError("no timed images to summarise")
    names: Dict[str, None] = {}
    for r in records:
        for k in r["stages"]:
            names.setdefault(k, None)
    stages = {k: statistics.median(r["stages"].get(k, 0.0) for r in records) for k in names}
    extrapolated = any(r["scale"] != 1.0 for r in records)
    out = {
        "stages": stages,
        "total": statistics.median(r["total"] for r in records),
        "total_with_proposals": statistics.median(
            r["total"] + r["stages"].get("proposals", 0.0) for r in records
        ),
        "windows_per_image": [r["windows"] for r in records],
        "extrapolated": extrapolated,
    }
    if extrapolated:
        out["measured_windows"] = max(r["measured_windows"] for r in records)
        out["extrapolated_stages"] = sorted({s for r in records for s in r["extrapolated_stages"]})
    out["per_image"] = list(records)
    return out
