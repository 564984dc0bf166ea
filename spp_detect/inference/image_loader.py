"""Reading images and computing their selective search windows ahead of the network, inline or
in a pool of worker processes (``detect_folder``'s CPU-bound half).

A file that cannot be used (corrupt, empty, not an image, too small for one feature cell, above
the pixel limit, deleted mid-run) comes back with a one-line reason instead of an exception, so
that one bad file never stops a folder. Worker processes import this module, so its top level
imports no torch (startup time).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from spp_detect.datasets.images import ImageReadError, check_min_size, read_image
from spp_detect.proposals.selective_search import selective_search
from spp_detect.proposals.settings import ProposalSettings

__all__ = ["LoadedImage", "LoadSettings", "load_and_propose", "iter_loaded", "one_line"]

logger = logging.getLogger(__name__)

# Images read and segmented ahead of the network, per worker (bounds memory).
_PREFETCH_PER_JOB = 2

# (image path, precomputed windows float32 [R, 4] or None)
Task = Tuple[str, Optional[np.ndarray]]


@dataclass(frozen=True)
class LoadSettings:
    """What every image is checked and segmented with."""

    # Smallest usable side in pixels: one conv5 cell (sec. 2.3: the SPP layer needs a
    # non-empty map) and the backbone's own minimum input.
    min_side: int
    # Images with more pixels are reported, not decoded (None: no limit).
    max_pixels: Optional[int]
    proposals: ProposalSettings


@dataclass
class LoadedImage:
    """What a worker hands to the main process for one image."""

    image: Optional[np.ndarray] = None  # [H, W, 3] uint8 RGB
    proposals: Optional[np.ndarray] = None  # float32 [R, 4] xyxy, image pixels
    seconds: Dict[str, float] = field(default_factory=dict)
    reason: Optional[str] = None  # one line, when the image cannot be used
    stage: str = "read"  # where it failed: "read", "proposals" or "worker"


def one_line(exc: BaseException) -> str:
    """``"Type: message"`` on one line."""
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _init_worker() -> None:
    import cv2

    # One process per core does the parallel work; OpenCV's own threads would oversubscribe.
    cv2.setNumThreads(1)


def load_and_propose(
    path: str, settings: LoadSettings, proposals: Optional[np.ndarray] = None
) -> LoadedImage:
    """Read one image, check its size and compute its selective search windows (unless
    ``proposals``, float32 [R, 4] xyxy in image pixels, are given).

    Never raises for a bad file: the reason is returned in ``LoadedImage.reason``.
    """
    out = LoadedImage()
    t = time.perf_counter()
    try:
        image = read_image(path, max_pixels=settings.max_pixels)
        check_min_size(image, settings.min_side, path)
    except ImageReadError as exc:
        out.reason = exc.reason
        return out
    except MemoryError:
        out.reason = "not enough memory to read this image"
        return out
    out.seconds["read"] = time.perf_counter() - t
    if proposals is None:
        t = time.perf_counter()
        try:
            proposals = selective_search(image, settings.proposals)
        except MemoryError:
            out.reason, out.stage = "not enough memory for selective search", "proposals"
            return out
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the folder
            out.reason, out.stage = f"selective search failed ({one_line(exc)})", "proposals"
            return out
        out.seconds["proposals"] = time.perf_counter() - t
    out.image, out.proposals = image, proposals
    return out


def iter_loaded(tasks: Sequence[Task], settings: LoadSettings, jobs: int) -> Iterator[LoadedImage]:
    """``load_and_propose`` over ``tasks``, yielded in order; ``jobs > 1`` prefetches in
    worker processes. A worker that dies (killed, out of memory) costs its image, reported
    with stage "worker"; the remaining images are then read in this process."""
    if jobs <= 1:
        for path, boxes in tasks:
            yield load_and_propose(path, settings, boxes)
        return
    # spawn, not fork: the main process already runs PyTorch and OpenCV threads.
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker)
    pending: deque = deque()  # futures of tasks[done:submitted], in order
    submitted = done = 0
    broken = False
    try:
        while done < len(tasks) and not broken:
            while submitted < len(tasks) and len(pending) < jobs * _PREFETCH_PER_JOB:
                path, boxes = tasks[submitted]
                pending.append(pool.submit(load_and_propose, path, settings, boxes))
                submitted += 1
            try:
                loaded = pending.popleft().result()
            except cf.process.BrokenProcessPool:
                reason = "worker process died reading this image (out of memory?)"
                loaded, broken = LoadedImage(reason=reason, stage="worker"), True
            done += 1
            yield loaded
    finally:
        pool.shutdown(wait=not broken, cancel_futures=True)
    if broken:
        logger.warning("worker pool broke; reading the remaining images in this process")
        for path, boxes in tasks[done:]:
            yield load_and_propose(path, settings, boxes)
