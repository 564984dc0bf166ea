"""Detection over a folder, a glob or a single image: the library behind ``spp-detect detect``.

Per image: read and check its size, selective search (``image_loader``: the CPU-bound part,
in ``jobs`` worker processes ahead of the network) -> ``Predictor`` (the detector with this
run's settings) -> one line appended to ``detections.jsonl`` and an annotated copy
(``folder_results``). A file that cannot be used goes to ``errors`` with a one-line reason and
the run goes on; a killed run continues where it stopped with ``resume=True``. The loop over
the images is ``folder_loop.FolderLoop``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from spp_detect import distributed as dist
from spp_detect.datasets.images import DEFAULT_MAX_PIXELS
from spp_detect.errors import UserInputError
from spp_detect.proposals.settings import MODES

from .folder_loop import FolderLoop, combine_totals
from .folder_results import FolderResults
from .image_loader import LoadSettings
from .inputs import describe_input, precomputed_windows, resolve_inputs

__all__ = ["detect_folder", "format_summary", "DEFAULT_SCORE_THRESH"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Default thresholds for showing detections: an SVM margin above 0 is the SVM's own decision
# boundary; a softmax probability above 0.5 beats every other class and background together.
DEFAULT_SCORE_THRESH = {"svm": 0.0, "softmax": 0.5}


def _check_arguments(
    jobs: int,
    proposal_mode: Optional[str],
    max_proposals: Optional[int],
    scales: Optional[Sequence[int]],
    max_pixels: Optional[int],
) -> None:
    if jobs < 1:
        raise UserInputError(f"--jobs must be >= 1, got {jobs}")
    if proposal_mode is not None and proposal_mode not in MODES:
        raise UserInputError(f"--proposals must be one of {MODES}, got {proposal_mode!r}")
    if max_proposals is not None and max_proposals < 1:
        raise UserInputError(f"--max-proposals must be >= 1, got {max_proposals}")
    if scales is not None and (not scales or min(scales) < 1):
        raise UserInputError(f"--scales must be positive pixel sizes, got {list(scales)}")
    if max_pixels is not None and max_pixels < 1:
        raise UserInputError(f"--max-pixels must be >= 1, got {max_pixels}")


def _check_output(output_dir: Path, exist_ok: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserInputError(f"{output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not exist_ok:
        raise UserInputError(
            f"{output_dir}: output folder exists and is not empty; pass --resume to continue "
            "an earlier run there, --exist-ok to start again in it, or choose another --output"
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _make_predictor(model: Any, device: Optional[str], score_thresh: Optional[float], **prop):
    """A ``Predictor`` with this run's settings; the caller's detector is left as it was."""
    from spp_detect.modeling.base import WindowDetector
    from spp_detect.modeling.build import load_detector
    from spp_detect.utils import resolve_device

    from .predictor import Predictor

    dev = resolve_device(device)
    detector = model if isinstance(model, WindowDetector) else load_detector(model, dev)
    if score_thresh is None:
        score_thresh = DEFAULT_SCORE_THRESH[detector.config.test.classifier]
    settings = detector.config.proposals.replace(mode=prop["mode"], max_proposals=prop["max"])
    return Predictor(
        detector, proposals=settings, scales=prop["scales"], device=dev,
        score_thresh=float(score_thresh),
    )  # fmt: skip


def _header(model: Any, predictor: Any, source: str, save_images: bool) -> Dict[str, Any]:
    """The run's settings, written at the top of ``detections.json``."""
    import dataclasses

    is_path = isinstance(model, (str, os.PathLike))
    config = predictor.detector.config
    return {
        "model": os.fspath(model) if is_path else None,
        "model_sha256": _file_sha256(Path(model)) if is_path else None,
        "method": predictor.detector.method,
        "class_names": list(predictor.class_names),
        "input": source,
        "score_thresh": config.test.score_thresh,
        "classifier": config.test.classifier,
        "test": dataclasses.asdict(config.test),
        "scales": list(config.model.scales),
        "proposals": predictor.proposal_settings.to_dict(),
        "save_images": save_images,
        "box_format": "xyxy, continuous pixels of the upright image (w = x2 - x1)",
    }


def _load_settings(predictor: Any, max_pixels: Optional[int]) -> LoadSettings:
    backbone = predictor.detector.backbone
    return LoadSettings(
        # One conv5 cell (sec. 2.3: the SPP layer needs a non-empty map) covers `stride`
        # pixels; anything smaller holds no object the detector could see.
        min_side=max(int(getattr(backbone, "min_input_size", 1)), int(backbone.stride)),
        max_pixels=max_pixels,
        proposals=predictor.proposal_settings,
    )


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
    resume: bool = False,
) -> Dict[str, Any]:
    """Detect objects in every image of a folder, a glob or one file.

    Args:
        model: a ``model.pt`` path (``WindowDetector.save``) or a loaded ``WindowDetector``,
            which is left exactly as it was (weights, device, mode, config, head).
        input_path: folder (recursive, sorted), image file, glob pattern, or list of files.
        output_dir: gets ``detections.jsonl`` (one line per image, as each finishes),
            ``detections.json``, ``detections_coco.json``, ``coco_images.json`` and, with
            ``save_images``, ``images/<relative name>`` (see ``folder_results``).
        score_thresh: keep detections scoring above this (``None``: ``DEFAULT_SCORE_THRESH``
            of the model's classifier: 0 for SVM margins, 0.5 for softmax probabilities).
        device: "cpu", "cuda", "cuda:N" or None (CUDA when present).
        proposal_mode, max_proposals: selective search "fast" / "quality" and the window cap
            (``None``: the model's ``config.proposals``).
        scales: test scales (shorter side in pixels; ``None``: the model's).
        jobs: worker processes reading images and running selective search ahead of the
            network (1: everything in this process).
        exist_ok: write into an existing non-empty ``output_dir`` (a fresh run).
        max_pixels: images with more pixels are reported, not decoded (``None``: no limit).
        progress: show a tqdm bar (images per second).
        proposals: precomputed windows (float32 [R, 4] xyxy, image pixels) by image id: the
            relative name without its suffix (``sub/a``) or the file's stem (``a``, as in VOC
            and in ``load_proposals_file``); other images get selective search.
        resume: continue an earlier run in ``output_dir``: images with a line in its
            ``detections.jsonl`` are not processed again (except detector failures), and the
            final files cover both runs. The model and settings must be the same.

    Under torchrun (``spp_detect.distributed``), each rank detects its contiguous shard of
    the images into ``detections.rank<R>.jsonl``; rank 0 merges the parts in rank order and
    writes the final files, so the outputs are those of one process. ``jobs`` is per rank.
    Returns:
        The summary: ``images`` (found), ``resumed`` (done by an earlier run), ``processed``,
        ``skipped``, ``failed`` (readable images the detector failed on), ``detections``,
        ``seconds``, ``stage_seconds`` (this run's totals), ``errors`` and ``outputs``.
    Raises:
        UserInputError: a missing or invalid model, an input that names no image, an existing
            output folder without ``exist_ok`` or ``resume``, bad numbers, an unknown mode, a
            resumed folder written with other settings.
    """
    _check_arguments(jobs, proposal_mode, max_proposals, scales, max_pixels)
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_file():
        raise UserInputError(f"{model}: model file not found")
    output_dir = Path(output_dir)
    items = resolve_inputs(input_path, exclude=output_dir)
    with dist.all_ranks_ok("detect: output folder"):  # every rank checks before any writes
        _check_output(output_dir, exist_ok or resume)
    predictor = _make_predictor(
        model, dist.local_device(device), score_thresh, mode=proposal_mode, max=max_proposals,
        scales=scales,
    )  # fmt: skip
    header = _header(model, predictor, describe_input(input_path), save_images)
    options = dict(save_images=save_images, jobs=jobs, progress=progress, max_pixels=max_pixels)
    return _run(predictor, items, output_dir, header, resume, proposals, **options)


def _run(
    predictor: Any,
    items: Sequence[Tuple[Path, str]],
    output_dir: Path,
    header: Dict[str, Any],
    resume: bool,
    proposals: Optional[Mapping[str, np.ndarray]],
    save_images: bool,
    jobs: int,
    progress: bool,
    max_pixels: Optional[int],
) -> Dict[str, Any]:
    """``detect_folder`` once its arguments are checked: this rank's share of ``items`` (all
    of them in one process) detected into ``output_dir``; returns rank 0's summary."""
    part = dist.rank() if dist.is_distributed() else None
    results = FolderResults(output_dir, header, resume, part=part)
    done = _start(results)
    # Under torchrun: this rank's contiguous shard of the images (InferenceSampler).
    todo = [(path, name) for path, name in dist.shard(items) if name not in done]
    tasks = [(str(path), precomputed_windows(proposals, name)) for path, name in todo]
    settings = _load_settings(predictor, max_pixels)
    resumed = sum(name in done for _, name in items)
    where = f" (rank {dist.rank()} of {dist.world_size()})" if part is not None else ""
    logger.info(
        "detecting in %d images from %s%s (%d done earlier; %s, %s proposals up to %d, "
        "%d job(s))", len(todo), header["input"], where, resumed, predictor.detector.method,
        settings.proposals.mode, settings.proposals.max_proposals, jobs,
    )  # fmt: skip
    loop = FolderLoop(predictor, results, save_images)
    t0 = time.perf_counter()
    with dist.all_ranks_ok("detect"):
        try:
            loop.run(todo, tasks, settings, jobs, progress and dist.is_main_process())
        finally:
            results.close()  # what is done stays on disk for a resumed run
    totals = dist.gather(loop.totals(tasks, time.perf_counter() - t0))
    summary = _finish(results, totals, {"images": len(items), "resumed": resumed, "jobs": jobs})
    logger.info(
        "%d/%d images processed, %d skipped, %d detections, %.1f s",
        summary["processed"], len(items), summary["skipped"], summary["detections"],
        summary["seconds"],
    )  # fmt: skip
    return summary


def _start(results: FolderResults) -> Set[str]:
    """Prepare the output folder (rank 0: earlier results checked) and start writing ->
    the names of the images an earlier run finished."""
    with dist.all_ranks_ok("detect: earlier results"):
        if dist.is_main_process():
            results.prepare()
    with dist.all_ranks_ok("detect: start"):
        done = results.start()
    return done


def _finish(
    results: FolderResults, totals: Optional[List[Dict[str, Any]]], run: Dict[str, Any]
) -> Dict[str, Any]:
    """Rank 0 (or the one process) writes the final files; every rank returns its summary."""
    summary = None
    with dist.all_ranks_ok("detect: final files"):
        if totals is not None:  # rank 0 (or the one process) writes the final files
            run["processes"] = len(totals)
            summary = results.finish(dict(run, **combine_totals(totals)))
    return dist.all_gather(summary)[0]  # every rank returns rank 0's summary


def format_summary(summary: Dict[str, Any]) -> str:
    """A few human-readable lines from ``detect_folder``'s summary."""
    s = summary
    n = max(1, s["images"] - s.get("resumed", 0))
    lines = [
        f"{s['images']} images: {s['processed']} processed, {s['skipped']} skipped, "
        f"{s['detections']} detections in {s['seconds']:.1f} s "
        f"({n / max(s['seconds'], 1e-9):.2f} images/s)"
    ]
    if s.get("resumed"):
        lines.append(f"resumed: {s['resumed']} images were done by an earlier run")
    if s["stage_seconds"]:
        stages = ", ".join(
            f"{k} {v:.2f} s ({1000 * v / n:.0f} ms/img)" for k, v in s["stage_seconds"].items()
        )
        par = f" (proposals summed over {s['jobs']} workers)" if s["jobs"] > 1 else ""
        lines.append(f"time per stage{par}: {stages}")
    errors: List[Dict[str, Any]] = s.get("errors", [])
    for e in errors[:20]:
        lines.append(f"  skipped {e['file']}: {e['reason']}")
    if len(errors) > 20:
        lines.append(f"  ... and {len(errors) - 20} more (see {s['outputs']['detections']})")
    out = s["outputs"]
    lines.append(f"detections: {out['detections']} (one line per image: {out['jsonl']})")
    lines.append(f"COCO results: {out['coco']} (ids in {out['coco_images']})")
    if out.get("images"):
        lines.append(f"annotated images: {out['images']}")
    return "\n".join(lines)
