"""Proposals of many images: cached ones are loaded, the rest computed in worker processes.

Errors: ``compute_proposals`` raises on the first image that cannot be read or segmented, with
the file's name in the message (``on_error="raise"``, the default), or logs it and leaves that
image out of the result (``on_error="skip"``).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from spp_detect.datasets.images import ImageReadError
from spp_detect.proposals.cache import ProposalCache, read_image_bytes
from spp_detect.proposals.settings import ProposalSettings

__all__ = ["compute_proposals"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Item = Tuple[str, Path]


def compute_proposals(
    records: Iterable[Any],
    cache_dir: PathLike,
    settings: ProposalSettings,
    jobs: int = 1,
    progress: bool = True,
    on_error: str = "raise",
    errors: Optional[Dict[str, str]] = None,
) -> Dict[str, np.ndarray]:
    """Proposals of many images: cached ones are loaded, the rest computed in parallel.

    Args:
        records: ``ImageRecord``s (anything with ``image_id`` and ``path``) or
            ``(image_id, path)`` pairs.
        cache_dir: the :class:`ProposalCache` folder.
        settings: how windows are proposed (part of every cache key).
        jobs: worker processes for the images to compute (``1``: in this process). Workers
            are spawned, not forked, so they are safe to start from a process that already
            runs threads (PyTorch, OpenCV); as with any spawned pool, a calling script needs
            an ``if __name__ == "__main__":`` guard. Not part of any key: how the work is
            spread, not what it computes.
        progress: show a tqdm bar.
        on_error: ``"raise"``: the first image that fails stops the run with its file name in
            the message; ``"skip"``: log it and leave it out of the result.
        errors: with ``on_error="skip"``, filled with ``{image_id: "<path>: <reason>"}`` for
            the images left out.
    Returns:
        ``{image_id: np.ndarray[R, 4] float32}`` (continuous xyxy in image pixels), in the
        order of ``records``.
    """
    from tqdm import tqdm

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    items = _items(records)
    cache = ProposalCache(cache_dir, settings)
    cache.clean_tmp()
    t0 = time.perf_counter()
    failures = _Failures(on_error, {} if errors is None else errors)
    result: Dict[str, np.ndarray] = {}
    with tqdm(total=len(items), desc="proposals", unit="img", disable=not progress) as bar:
        todo = _load_cached(cache, items, result, failures, bar)
        reused = len(result)
        if jobs == 1 or len(todo) <= 1:
            for image_id, path in todo:
                try:
                    result[image_id] = cache.get(image_id, path)
                except Exception as e:  # noqa: BLE001 - reported per image
                    failures.add(image_id, path, e)
                bar.update(1)
        else:
            _compute_parallel(cache, todo, jobs, result, failures, bar)
    n_boxes = [len(b) for b in result.values()]
    logger.info(
        "proposals (%s): %d images, %d reused from %s, %d computed, %d failed, "
        "%.1f windows per image, %.1f s",
        settings.mode,
        len(items),
        reused,
        cache_dir,
        len(result) - reused,
        failures.count,
        float(np.mean(n_boxes)) if n_boxes else 0.0,
        time.perf_counter() - t0,
    )
    return {i: result[i] for i, _ in items if i in result}


class _Failures:
    """Raises or records an image that could not be read or segmented (per ``on_error``)."""

    def __init__(self, on_error: str, errors: Dict[str, str]) -> None:
        self.on_error = on_error
        self.errors = errors
        self.count = 0

    def add(self, image_id: str, path: Path, e: BaseException) -> None:
        named = isinstance(e, ImageReadError)  # its message already names the file
        err = str(e) if named else f"{path}: selective search failed ({type(e).__name__}: {e})"
        if self.on_error == "raise":
            if named:
                raise e
            raise ValueError(err) from e
        logger.warning("skipping image %s: %s", image_id, err)
        self.errors[image_id] = err
        self.count += 1


def _items(records: Iterable[Any]) -> List[Item]:
    """``(image_id, path)`` pairs, each id once (an id naming two files is an error)."""
    out = []
    seen: Dict[str, Path] = {}
    for r in records:
        if isinstance(r, (tuple, list)) and len(r) == 2:
            image_id, path = str(r[0]), Path(r[1])
        elif hasattr(r, "image_id") and hasattr(r, "path"):
            image_id, path = str(r.image_id), Path(r.path)
        else:
            raise ValueError(f"expected ImageRecord or (image_id, path), got {type(r).__name__}")
        if image_id in seen:
            if seen[image_id] != path:
                raise ValueError(
                    f"image_id {image_id!r} names two files: {seen[image_id]} and {path}"
                )
            continue
        seen[image_id] = path
        out.append((image_id, path))
    return out


def _load_cached(
    cache: ProposalCache,
    items: List[Item],
    result: Dict[str, np.ndarray],
    failures: _Failures,
    bar: Any,
) -> List[Item]:
    """Fill ``result`` with the cache hits (cheap, in this process); return the misses."""
    todo = []
    for image_id, path in items:
        try:
            boxes = cache.load(image_id, cache.key(image_id, data=read_image_bytes(path)))
        except ImageReadError as e:
            failures.add(image_id, path, e)
            bar.update(1)
            continue
        if boxes is None:
            todo.append((image_id, path))
        else:
            result[image_id] = boxes
            bar.update(1)
    return todo


def _init_worker() -> None:
    import cv2

    # One process per core does the parallel work; OpenCV's own threads would oversubscribe.
    cv2.setNumThreads(1)


def _compute_one(
    cache_dir: str, settings: ProposalSettings, image_id: str, path: str
) -> np.ndarray:
    return ProposalCache(cache_dir, settings).get(image_id, path)


def _compute_parallel(
    cache: ProposalCache,
    todo: List[Item],
    jobs: int,
    result: Dict[str, np.ndarray],
    failures: _Failures,
    bar: Any,
) -> None:
    """Compute (and cache) the proposals of ``todo`` in ``jobs`` spawned worker processes."""
    ctx = multiprocessing.get_context("spawn")
    args = (str(cache.cache_dir), cache.settings)
    with cf.ProcessPoolExecutor(
        min(jobs, len(todo)), mp_context=ctx, initializer=_init_worker
    ) as pool:
        futures = {pool.submit(_compute_one, *args, i, str(p)): (i, p) for i, p in todo}
        try:
            for fut in cf.as_completed(futures):
                image_id, path = futures[fut]
                try:
                    result[image_id] = fut.result()
                except BrokenProcessPool as e:  # not this image's fault
                    raise RuntimeError(
                        "proposal worker processes died (out of memory? or the calling "
                        "script lacks an `if __name__ == '__main__':` guard, which "
                        "spawned workers need)"
                    ) from e
                except Exception as e:  # noqa: BLE001 - reported per image
                    failures.add(image_id, path, e)
                bar.update(1)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
