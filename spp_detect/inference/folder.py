"""Detection over a folder, a glob or a single image: the library behind ``spp-detect detect``.

Pipeline per image: read (``datasets.images.read_image``: any common format to RGB uint8) ->
size checks -> selective search (the CPU-bound part; in ``jobs`` worker processes, ahead of the
network) -> ``detector.detect`` -> annotated copy. A file that cannot be used (corrupt, empty,
not an image, too small for one feature cell, above the pixel limit, deleted mid-run) goes to
the ``errors`` list with a one-line reason, and the run goes on.

Outputs (all written atomically: a reader never sees a half-written file):

- ``detections.json``: ``{"images": [{file, path, width, height, detections: [{label, score,
  box: [x1, y1, x2, y2]}], annotated}], "errors": [{file, reason, stage}], "summary", ...}``;
  boxes in the continuous pixel frame of the upright image (``w = x2 - x1``). Rewritten every
  few seconds during the run with ``"complete": false``.
- ``detections_coco.json``: the COCO results format (a list of ``{image_id, category_id,
  bbox: [x, y, w, h], score}``, what ``pycocotools.coco.COCO.loadRes`` reads), and
  ``coco_images.json``: the ids it uses (``images``: ``{id, file_name, width, height}``;
  ``categories``: ``{id, name}`` with ``id = label + 1``; empty ``annotations``).
- ``images/<file>``: the image with boxes, class names and scores drawn.

Worker processes import this module, so its top level imports no torch (startup time).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import logging
import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from spp_detect.datasets.images import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    ImageReadError,
    check_min_size,
    list_images,
    read_image,
)
from spp_detect.proposals.selective_search import selective_search

__all__ = [
    "detect_folder",
    "resolve_inputs",
    "to_coco_results",
    "format_summary",
    "DETECTIONS_FILE",
    "COCO_RESULTS_FILE",
    "COCO_IMAGES_FILE",
    "IMAGES_DIR",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

DETECTIONS_FILE = "detections.json"
# Default thresholds for showing detections: an SVM margin above 0 is the SVM's own decision
# boundary; a softmax probability above 0.5 beats every other class and background together.
DEFAULT_SCORE_THRESH = {"svm": 0.0, "softmax": 0.5}
COCO_RESULTS_FILE = "detections_coco.json"
COCO_IMAGES_FILE = "coco_images.json"
IMAGES_DIR = "images"

# detections.json is rewritten (atomically) at most this often while the run goes on.
_FLUSH_SECONDS = 10.0
# Images read and segmented ahead of the network, per worker (bounds memory).
_PREFETCH_PER_JOB = 2
_GLOB_CHARS = set("*?[")


@dataclass
class _Loaded:
    """What a worker hands to the main process for one image."""

    image: Optional[np.ndarray] = None  # [H, W, 3] uint8 RGB
    proposals: Optional[np.ndarray] = None  # float32 [R, 4] xyxy, image pixels
    seconds: Dict[str, float] = field(default_factory=dict)
    reason: Optional[str] = None  # one line, when the image cannot be used
    stage: str = "read"


# --------------------------------------------------------------------------------------------
# inputs


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard component."""
    parts = Path(pattern).parts
    base: List[str] = []
    for part in parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def resolve_inputs(
    input_path: Union[PathLike, Sequence[PathLike]], exclude: Optional[PathLike] = None
) -> List[Tuple[Path, str]]:
    """The images an ``--input`` names, each with its name relative to the input.

    Args:
        input_path: a folder (recursive), one file, a glob (``**`` recursive), or a list of
            files (named by their file names).
        exclude: a folder whose files are left out (the output folder, when it lies inside
            the input folder, so that annotated images are never read back as inputs).
    Returns:
        ``[(path, relative_name)]`` sorted by path; ``relative_name`` uses ``/`` and is
        relative to the folder, to the glob's fixed prefix, or the file's own name.
    Raises:
        ValueError: the path does not exist, or names no image.
    """
    if isinstance(input_path, (list, tuple)):
        # An explicit list (the demo's test split): every file is kept, named by its name.
        paths = sorted((Path(p) for p in input_path), key=str)
        text, base = f"{len(paths)} listed files", None
    else:
        text = os.fspath(input_path)
        paths = list_images(text)
        p = Path(text)
        base = p if p.is_dir() else (p.parent if p.is_file() else _glob_base(text))
    excl = Path(exclude).resolve() if exclude is not None else None
    out: List[Tuple[Path, str]] = []
    for path in paths:
        if excl is not None and excl in path.resolve().parents:
            continue
        try:
            rel = path.relative_to(base).as_posix() if base is not None else path.name
        except ValueError:
            rel = path.name
        out.append((path, rel))
    if not out:
        kinds = ", ".join(SUPPORTED_EXTENSIONS)
        raise ValueError(f"{text}: no images found (looked for {kinds})")
    return out


# --------------------------------------------------------------------------------------------
# reading and proposals (runs in worker processes when jobs > 1)


def _init_worker() -> None:
    import cv2

    # One process per core does the parallel work; OpenCV's own threads would oversubscribe.
    cv2.setNumThreads(1)


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def load_and_propose(
    path: str,
    min_side: int,
    max_pixels: Optional[int],
    proposal_kwargs: Dict[str, Any],
    proposals: Optional[np.ndarray] = None,
) -> _Loaded:
    """Read one image, check its size and compute its selective search windows (unless
    ``proposals``, float32 [R, 4] xyxy in image pixels, are given).

    Never raises for a bad file: the reason is returned in ``_Loaded.reason``.
    """
    out = _Loaded()
    t = time.perf_counter()
    try:
        image = read_image(path, max_pixels=max_pixels)
        # One conv5 cell (sec. 2.3: the SPP layer needs a non-empty map) covers `stride`
        # pixels; anything smaller holds no object the detector could see.
        check_min_size(image, min_side, path)
    except ImageReadError as exc:
        out.reason = exc.reason
        return out
    except MemoryError:
        out.reason = "not enough memory to read this image"
        return out
    out.seconds["read"] = time.perf_counter() - t
    if proposals is not None:
        out.image, out.proposals = image, proposals
        return out
    t = time.perf_counter()
    try:
        out.proposals = selective_search(image, **proposal_kwargs)
    except MemoryError:
        out.reason, out.stage = "not enough memory for selective search", "proposals"
        return out
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the folder
        out.reason, out.stage = f"selective search failed ({_one_line(exc)})", "proposals"
        return out
    out.seconds["proposals"] = time.perf_counter() - t
    out.image = image
    return out


def _iter_loaded(
    tasks: Sequence[Tuple[str, Optional[np.ndarray]]], jobs: int, kwargs: Dict[str, Any]
) -> Iterator[_Loaded]:
    """``load_and_propose`` over ``(path, precomputed proposals or None)``, in order;
    ``jobs > 1`` prefetches in worker processes."""
    if jobs <= 1:
        for path, boxes in tasks:
            yield load_and_propose(path, proposals=boxes, **kwargs)
        return
    # spawn, not fork: the main process already runs PyTorch and OpenCV threads.
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker)
    pending: deque = deque()  # futures of tasks[done:submitted], in order
    submitted = done = 0
    broken = False
    try:
        while done < len(tasks):
            while submitted < len(tasks) and len(pending) < jobs * _PREFETCH_PER_JOB:
                path, boxes = tasks[submitted]
                pending.append(pool.submit(load_and_propose, path, proposals=boxes, **kwargs))
                submitted += 1
            try:
                loaded = pending.popleft().result()
            except cf.process.BrokenProcessPool:
                # A worker died (killed, out of memory): report this image, go on inline.
                loaded = _Loaded(reason="worker process died reading this image (out of memory?)")
                broken = True
            done += 1
            yield loaded
            if broken:
                break
    finally:
        pool.shutdown(wait=not broken, cancel_futures=True)
    if broken:
        logger.warning("worker pool broke; reading the remaining images in this process")
        for path, boxes in tasks[done:]:
            yield load_and_propose(path, proposals=boxes, **kwargs)


# --------------------------------------------------------------------------------------------
# outputs


def _lookup(proposals: Optional[Mapping[str, np.ndarray]], name: str) -> Optional[np.ndarray]:
    """The precomputed windows of the image ``name`` (relative name), if any."""
    if proposals is None:
        return None
    no_suffix = str(Path(name).with_suffix("")).replace(os.sep, "/")
    for key in (no_suffix, Path(name).stem):
        if key in proposals:
            return np.asarray(proposals[key], dtype=np.float32).reshape(-1, 4)
    return None


def to_coco_results(entries: Sequence[Dict[str, Any]], class_names: Sequence[str]):
    """COCO results and the id mapping they use.

    Args:
        entries: ``detections.json`` image entries (``file``, ``width``, ``height``,
            ``detections`` with ``box`` = continuous xyxy pixels).
    Returns:
        ``(results, mapping)``: ``results`` a list of ``{image_id, category_id, bbox: [x, y,
        w, h], score}`` (``image_id`` = 1-based position in ``entries``, ``category_id`` =
        label + 1; COCO boxes are continuous too, so ``w = x2 - x1`` with no ``+1``), and
        ``mapping`` = ``{images, categories, annotations: []}``.
    """
    cat_id = {name: i + 1 for i, name in enumerate(class_names)}
    results, images = [], []
    for k, e in enumerate(entries, start=1):
        images.append({"id": k, "file_name": e["file"], "width": e["width"], "height": e["height"]})
        for d in e["detections"]:
            x1, y1, x2, y2 = d["box"]
            results.append(
                {
                    "image_id": k,
                    "category_id": cat_id[d["label"]],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": d["score"],
                }
            )
    categories = [{"id": cat_id[n], "name": n} for n in class_names]
    return results, {"images": images, "categories": categories, "annotations": []}


def format_summary(summary: Dict[str, Any]) -> str:
    """A few human-readable lines from ``detect_folder``'s summary."""
    s = summary
    n = max(1, s["processed"])
    lines = [
        f"{s['images']} images: {s['processed']} processed, {s['skipped']} skipped, "
        f"{s['detections']} detections in {s['seconds']:.1f} s "
        f"({s['processed'] / max(s['seconds'], 1e-9):.2f} images/s)"
    ]
    if s["stage_seconds"]:
        stages = ", ".join(
            f"{k} {v:.2f} s ({1000 * v / n:.0f} ms/img)" for k, v in s["stage_seconds"].items()
        )
        par = f" (proposals summed over {s['jobs']} workers)" if s["jobs"] > 1 else ""
        lines.append(f"time per stage{par}: {stages}")
    for e in s.get("errors", [])[:20]:
        lines.append(f"  skipped {e['file']}: {e['reason']}")
    if len(s.get("errors", [])) > 20:
        lines.append(f"  ... and {len(s['errors']) - 20} more (see {s['outputs']['detections']})")
    lines.append(f"detections: {s['outputs']['detections']}")
    lines.append(f"COCO results: {s['outputs']['coco']} (ids in {s['outputs']['coco_images']})")
    if s["outputs"].get("images"):
        lines.append(f"annotated images: {s['outputs']['images']}")
    return "\n".join(lines)


def _check_output(output_dir: Path, exist_ok: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"{output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not exist_ok:
        raise ValueError(
            f"{output_dir}: output folder exists and is not empty; pass --exist-ok to write "
            "into it, or choose another --output"
        )


# --------------------------------------------------------------------------------------------
# the run


def detect_folder(
    model: Any,
    input_path: Union[PathLike, Sequence[PathLike]],
    output_dir: PathLike,
    score_thresh: Optional[float] = None,
    device: Optional[str] = None,
    proposal_mode: Optional[str] = None,
    max_proposals: Optional[int] = None,
    scales: Optional[Sequence[int]] = None,
    save_images: bool = True,
    jobs: int = 1,
    exist_ok: bool = False,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    proposals: Optional[Mapping[str, np.ndarray]] = None,
) -> Dict[str, Any]:
    """Detect objects in every image of a folder, a glob or one file.

    Args:
        model: a ``model.pt`` path (``WindowDetector.save``) or a loaded ``WindowDetector``.
        input_path: folder (recursive, sorted), image file, glob pattern, or list of files.
        output_dir: gets ``detections.json``, ``detections_coco.json``, ``coco_images.json``
            and, with ``save_images``, ``images/<relative name>``.
        score_thresh: keep detections scoring above this (``None``: ``DEFAULT_SCORE_THRESH``
            of the model's classifier: 0 for SVM margins, 0.5 for softmax probabilities).
        device: "cpu", "cuda", "cuda:N" or None (CUDA when present).
        proposal_mode, max_proposals: selective search "fast" / "quality" and the window cap
            (``None``: the model's ``proposals`` config).
        scales: test scales (shorter side in pixels; ``None``: the model's).
        jobs: worker processes reading images and running selective search ahead of the
            network (1: everything in this process).
        exist_ok: write into an existing non-empty ``output_dir``.
        max_pixels: images with more pixels are reported, not decoded (``None``: no limit).
        progress: show a tqdm bar (images per second).
        proposals: precomputed windows (float32 [R, 4] xyxy, image pixels) by image id: the
            relative name without its suffix (``sub/a``) or the file's stem (``a``, as in VOC
            and in ``load_proposals_file``); other images get selective search.
    Returns:
        The summary: ``images`` (found), ``processed``, ``skipped``, ``failed`` (readable
        images the detector failed on), ``detections``, ``seconds``, ``stage_seconds``
        (totals), ``errors`` and ``outputs`` (paths).
    Raises:
        ValueError: bad arguments: a missing or invalid model, an input that names no image, an
            existing output folder without ``exist_ok``, ``jobs < 1``, an unknown mode.
    """
    from tqdm import tqdm

    from spp_detect.modeling.base import WindowDetector
    from spp_detect.modeling.build import load_detector
    from spp_detect.utils import StageTimer, atomic_write_json, resolve_device
    from spp_detect.inference.visualize import annotated_name, draw_detections, save_image

    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if proposal_mode is not None and proposal_mode not in ("fast", "quality"):
        raise ValueError(f"--proposals must be 'fast' or 'quality', got {proposal_mode!r}")
    if max_proposals is not None and max_proposals < 1:
        raise ValueError(f"--max-proposals must be >= 1, got {max_proposals}")
    if scales is not None and (not scales or min(scales) < 1):
        raise ValueError(f"--scales must be positive pixel sizes, got {list(scales)}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {max_pixels}")
    is_detector = isinstance(model, WindowDetector)
    if not is_detector and not Path(model).is_file():
        raise ValueError(f"{model}: model file not found")
    output_dir = Path(output_dir)
    items = resolve_inputs(input_path, exclude=output_dir)
    _check_output(output_dir, exist_ok)

    dev = resolve_device(device)
    if is_detector:
        # The caller's model is left exactly as it was: a configured copy (shared weights), or
        # a deep copy when it has to move to another device.
        detector = model if model.device == dev else copy.deepcopy(model).to(dev)
    else:
        detector = load_detector(model, dev)
    cfg = detector.config
    if score_thresh is None:
        score_thresh = DEFAULT_SCORE_THRESH[cfg.test.classifier]
    prop_cfg = cfg.proposals.replace(mode=proposal_mode, max_proposals=max_proposals)
    detector = detector.with_settings(scales=scales, score_thresh=float(score_thresh))
    test_cfg, model_cfg = detector.config.test, detector.config.model
    backbone = detector.backbone
    min_side = max(int(getattr(backbone, "min_input_size", 1)), int(backbone.stride))
    kwargs = dict(
        min_side=min_side,
        max_pixels=max_pixels,
        proposal_kwargs=prop_cfg.selective_search_kwargs(),
    )

    listed = isinstance(input_path, (list, tuple))
    source = f"{len(items)} listed files" if listed else os.fspath(input_path)
    output_dir.mkdir(parents=True, exist_ok=True)
    det_path = output_dir / DETECTIONS_FILE
    class_names = list(detector.class_names)
    header = {
        "model": str(model) if not is_detector else None,
        "method": detector.method,
        "class_names": class_names,
        "input": source,
        "score_thresh": test_cfg.score_thresh,
        "classifier": test_cfg.classifier,
        "scales": list(model_cfg.scales),
        "proposals": {"mode": prop_cfg.mode, "max_proposals": prop_cfg.max_proposals},
        "box_format": "xyxy, continuous pixels of the upright image (w = x2 - x1)",
    }
    entries: List[Dict[str, Any]] = []
    errors: List[Dict[str, str]] = []
    timer = StageTimer(dev)
    n_dets = failed = 0

    def write(complete: bool, summary: Optional[Dict[str, Any]] = None) -> None:
        doc = dict(header, complete=complete, images=entries, errors=errors)
        if summary is not None:
            doc["summary"] = {k: v for k, v in summary.items() if k != "errors"}
        atomic_write_json(det_path, doc)

    logger.info(
        "detecting in %d images from %s (%s, %s proposals up to %d, %d job(s))",
        len(items), source, detector.method, prop_cfg.mode, prop_cfg.max_proposals, jobs,
    )  # fmt: skip

    def process(path: Path, name: str, loaded: _Loaded) -> None:
        nonlocal n_dets, failed
        for stage, sec in loaded.seconds.items():
            timer.times[stage] += sec
        if loaded.reason is not None:
            errors.append({"file": name, "reason": loaded.reason, "stage": loaded.stage})
            logger.debug("skipped %s: %s", path, loaded.reason)
            return
        image = loaded.image
        try:
            dets = detector.detect(image, loaded.proposals, timer=timer)
        except (ValueError, RuntimeError, MemoryError) as exc:
            # A readable image the network could not process (e.g. out of GPU memory):
            # reported, counted as a failure (exit code 1), and the run goes on.
            logger.warning("detection failed on %s: %s", path, _one_line(exc))
            logger.debug("traceback", exc_info=True)
            reason = f"detection failed ({_one_line(exc)})"
            errors.append({"file": name, "reason": reason, "stage": "detect"})
            failed += 1
            return
        entry = {
            "file": name,
            "path": str(path),
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "detections": dets.to_list(class_names),
        }
        n_dets += len(dets)
        if save_images:
            with timer("draw"):
                rel = Path(IMAGES_DIR) / annotated_name(name)
                save_image(output_dir / rel, draw_detections(image, dets, class_names))
            entry["annotated"] = rel.as_posix()
        entries.append(entry)

    t0 = last_flush = time.perf_counter()
    bar = tqdm(total=len(items), desc="detect", unit="img", disable=not progress)
    tasks = [(str(p), _lookup(proposals, name)) for p, name in items]
    n_given = sum(b is not None for _, b in tasks)
    if proposals is not None:
        logger.info("precomputed proposals for %d of %d images", n_given, len(tasks))
    try:
        loaded_iter = _iter_loaded(tasks, jobs, kwargs)
        for (path, name), loaded in zip(items, loaded_iter):
            process(path, name, loaded)
            bar.update(1)
            bar.set_postfix(dets=n_dets, skipped=len(errors), refresh=False)
            if time.perf_counter() - last_flush > _FLUSH_SECONDS:
                write(complete=False)
                last_flush = time.perf_counter()
    except BaseException:
        # Interrupted (Ctrl-C) or a system error: keep what was done, marked incomplete.
        write(complete=False)
        raise
    finally:
        bar.close()

    seconds = time.perf_counter() - t0
    coco_results, coco_ids = to_coco_results(entries, class_names)
    atomic_write_json(output_dir / COCO_RESULTS_FILE, coco_results)
    atomic_write_json(output_dir / COCO_IMAGES_FILE, coco_ids)
    summary: Dict[str, Any] = {
        "images": len(items),
        "processed": len(entries),
        "skipped": len(errors),
        "failed": failed,
        "detections": n_dets,
        "precomputed_proposals": n_given,
        "seconds": seconds,
        "stage_seconds": dict(timer.times),
        "jobs": jobs,
        "device": str(dev),
        "errors": errors,
        "outputs": {
            "detections": str(det_path),
            "coco": str(output_dir / COCO_RESULTS_FILE),
            "coco_images": str(output_dir / COCO_IMAGES_FILE),
            "images": str(output_dir / IMAGES_DIR) if save_images and entries else None,
        },
    }
    write(complete=True, summary=summary)
    logger.info(
        "%d/%d images processed, %d skipped, %d detections, %.1f s",
        len(entries), len(items), len(errors), n_dets, seconds,
    )  # fmt: skip
    return summary
