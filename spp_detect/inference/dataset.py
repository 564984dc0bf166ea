"""Detection over a dataset split, and its evaluation (VOC AP, optionally COCO-style AP).

Under ``torchrun`` (``spp_detect.distributed``) the split is sharded by rank: each rank
computes the proposals of its shard into the shared cache and detects its shard, writing
``partial/detections.rank<R>.jsonl`` as it goes (``resume=True`` continues from those files);
rank 0 gathers the detections, evaluates and writes the outputs. Without torchrun the same code
runs in one process with one shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import IO, Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from spp_detect import distributed as dist
from spp_detect.datasets.images import read_image
from spp_detect.datasets.voc import VOCDataset
from spp_detect.errors import UserInputError
from spp_detect.modeling.base import WindowDetector
from spp_detect.modeling.build import load_detector
from spp_detect.serialization import save_file
from spp_detect.proposals.compute import compute_proposals
from spp_detect.proposals.files import load_proposals_file
from spp_detect.structures import Detections
from spp_detect.utils import StageTimer, atomic_write_json, resolve_device

__all__ = ["detect_dataset", "dataset_proposals", "test_detector", "PARTIAL_DIR"]

logger = logging.getLogger(__name__)

# Per-rank detections of a test run, written as each image finishes (resumable).
PARTIAL_DIR = "partial"


def dataset_proposals(
    dataset: VOCDataset,
    config,
    cache_dir: Path,
    proposals_file: Optional[Union[str, Path]] = None,
) -> Dict[str, np.ndarray]:
    """Proposals for every image of a split: from a file, or selective search (cached).

    Under torchrun every rank first computes its shard into the shared cache folder; after
    all have finished, each loads the whole split from the cache.
    """
    if proposals_file is not None:
        proposals = load_proposals_file(proposals_file)
        missing = [r.image_id for r in dataset.records if r.image_id not in proposals]
        if missing:
            raise ValueError(f"{proposals_file}: no proposals for image {missing[0]!r}")
        return proposals
    folder = Path(cache_dir) / "proposals"
    if dist.is_distributed():
        with dist.all_ranks_ok("proposals"):
            compute_proposals(
                dist.shard(dataset.records), folder, config.proposals, jobs=config.workers
            )
    return compute_proposals(
        dataset.records, folder, config.proposals, jobs=config.workers,
        progress=not dist.is_distributed(),
    )  # fmt: skip


def detect_dataset(
    detector: WindowDetector,
    dataset: VOCDataset,
    proposals: Dict[str, np.ndarray],
    timer: Optional[StageTimer] = None,
    records: Optional[Sequence[Any]] = None,
    on_result=None,
) -> Dict[str, Detections]:
    """Run ``detector.detect`` on every image of the split (progress bar).

    Args:
        records: the images to detect (default: all of ``dataset.records``).
        on_result: called as ``on_result(image_id, detections)`` after each image.
    Returns:
        ``{image_id: Detections}`` in original-image pixels.
    """
    results: Dict[str, Detections] = {}
    records = dataset.records if records is None else records
    desc = f"detect ({detector.method})"
    if dist.is_distributed():
        desc += f" rank {dist.rank()}"
    for rec in tqdm(records, desc=desc, unit="img", leave=False):
        image = read_image(rec.path)
        dets = detector.detect(image, proposals[rec.image_id], timer=timer)
        results[rec.image_id] = dets
        if on_result is not None:
            on_result(rec.image_id, dets)
    return results


def _run_key(detector: WindowDetector, proposals_file) -> Dict[str, Any]:
    """What determines a test run's detections: a resumed run must have the same."""
    import dataclasses

    digest = hashlib.sha1()
    for name, tensor in sorted(detector.state_dict().items()):
        digest.update(name.encode())
        # Raw bytes via uint8 (numpy has no bfloat16: test.fast_head / fast_conv copies).
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    config = detector.config
    return json.loads(json.dumps({
        "weights": digest.hexdigest(),
        "method": detector.method,
        "class_names": list(detector.class_names),
        "test": dataclasses.asdict(config.test),
        "scales": list(config.model.scales),
        "proposals": str(proposals_file) if proposals_file else config.proposals.to_dict(),
    }, default=str))  # fmt: skip


class _PartialDetections:
    """This rank's ``partial/detections.rank<R>.jsonl``: a header line (``_run_key``), then
    ``{image_id, image_size, boxes, scores, labels}`` per image. Float32 values written as
    JSON numbers read back bit for bit."""

    def __init__(self, output_dir: Path, key: Dict[str, Any]) -> None:
        self.folder = output_dir / PARTIAL_DIR
        self.path = self.folder / f"detections.rank{dist.rank()}.jsonl"
        self.key = key
        self._file: Optional[IO[str]] = None

    def _read(self, path: Path) -> Dict[str, Detections]:
        done: Dict[str, Detections] = {}
        with open(path, "rb") as f:
            lines = [line for line in f if line.endswith(b"\n")]  # a cut last line: redo it
        if not lines:
            return done
        try:
            header = json.loads(lines[0]).get("header")
        except (ValueError, AttributeError):
            header = None
        if header != self.key:
            raise UserInputError(
                f"{path}: cannot resume: written with another model or other settings; "
                "rerun without --resume"
            )
        for lineno, line in enumerate(lines[1:], start=2):
            try:
                r = json.loads(line)
                boxes = torch.tensor(r["boxes"], dtype=torch.float32).reshape(-1, 4)
                dets = Detections(
                    boxes,
                    torch.tensor(r["scores"], dtype=torch.float32),
                    torch.tensor(r["labels"], dtype=torch.int64),
                    tuple(r["image_size"]),
                )
            except (ValueError, KeyError, TypeError) as e:
                raise UserInputError(f"{path}:{lineno}: not a detections record ({e})") from None
            done[r["image_id"]] = dets
        return done

    def start(self, resume: bool) -> Dict[str, Detections]:
        """Open this rank's file. Returns the detections earlier runs finished: every rank's
        file is read (the split of a resumed run may differ), or none without ``resume``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        done: Dict[str, Detections] = {}
        if resume:
            for path in sorted(self.folder.glob("detections.rank*.jsonl")):
                done.update(self._read(path))
        keep = resume and self.path.is_file() and self.path.stat().st_size > 0
        if keep:
            _truncate_partial_line(self.path)
        self._file = open(self.path, "a" if keep else "w", encoding="utf-8")
        if not keep:
            self._write({"header": self.key})
        return done

    def _write(self, obj: Dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()

    def add(self, image_id: str, dets: Detections) -> None:
        self._write({
            "image_id": image_id,
            "image_size": [int(v) for v in dets.image_size],
            "boxes": dets.boxes.detach().cpu().tolist(),
            "scores": dets.scores.detach().cpu().tolist(),
            "labels": dets.labels.detach().cpu().tolist(),
        })  # fmt: skip

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self, every_rank: bool) -> None:
        """Delete this rank's file (``every_rank``: also those of earlier runs with more ranks,
        and the folder when it is left empty)."""
        self.path.unlink(missing_ok=True)
        if every_rank:
            for path in self.folder.glob("detections.rank*.jsonl"):
                path.unlink(missing_ok=True)
            if not any(self.folder.iterdir()):
                self.folder.rmdir()


def _truncate_partial_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "rb+") as f:
            f.truncate(data.rfind(b"\n") + 1)


def test_detector(
    model: Union[str, Path, WindowDetector],
    dataset: VOCDataset,
    output_dir: Union[str, Path],
    device: Optional[str] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    proposals_file: Optional[Union[str, Path]] = None,
    use_07_metric: Optional[bool] = None,
    coco: bool = False,
    overrides: Optional[Dict[str, Any]] = None,
    scales: Optional[Sequence[int]] = None,
    resume: bool = False,
) -> Dict[str, Any]:
    """Detect over a split, write VOC results files and ``metrics.json``, return the metrics.

    Args:
        model: a ``model.pt`` path or a loaded detector.
        dataset: the split to test (its class list must be the model's).
        output_dir: gets ``results/comp4_det_<split>_<class>.txt``, ``detections.pt``,
            ``metrics.json``, ``pr_curves.png`` and, while the run goes on,
            ``partial/detections.rank<R>.jsonl`` (removed at the end).
        use_07_metric: VOC07 11-point AP (default for year 2007) or area AP.
        coco: also compute COCO-style AP through pycocotools (always for a ``COCODataset``).
        overrides: ``TestConfig`` fields to change (e.g. ``{"classifier": "softmax"}``); the
            detector given is not changed (``with_settings`` makes a configured one).
        scales: test scales instead of the model's ``config.model.scales``.
        resume: keep the images an interrupted run (any number of ranks) finished; the model
            and settings must be the same.
    Returns:
        The metrics on rank 0 (one process: always); ``{}`` on the other ranks.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(dist.local_device(device))
    detector = load_detector(model, dev) if not isinstance(model, WindowDetector) else model
    detector = detector.with_settings(scales=scales, **(overrides or {}))
    if list(dataset.class_names) != list(detector.class_names):
        raise ValueError(
            f"the model's classes {detector.class_names} differ from the dataset's "
            f"{dataset.class_names}"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else output_dir / "cache"
    proposals = dataset_proposals(dataset, detector.config, cache_dir, proposals_file)

    timer = StageTimer(dev)
    partial = _PartialDetections(output_dir, _run_key(detector, proposals_file))
    with dist.all_ranks_ok("detect"):
        done = partial.start(resume)
        mine = [r for r in dist.shard(dataset.records) if r.image_id not in done]
        if done:
            logger.info("resuming: %d images done earlier, %d to do", len(done), len(mine))
        t0 = time.perf_counter()
        try:
            dets = detect_dataset(detector, dataset, proposals, timer, mine, partial.add)
        finally:
            partial.close()
        seconds = time.perf_counter() - t0
    gathered = dist.gather(({k: d.to_dict() for k, d in dets.items()}, seconds, timer.times))
    metrics: Dict[str, Any] = {}
    with dist.all_ranks_ok("evaluate"):
        if gathered is not None:
            metrics = _evaluate(detector, dataset, output_dir, done, gathered, use_07_metric, coco)
    partial.remove(every_rank=dist.is_main_process())  # the outputs hold everything now
    return metrics


def _evaluate(detector, dataset, output_dir, done, gathered, use_07_metric, coco) -> Dict:
    """Rank 0: every rank's detections in split order -> detections.pt, metrics.json."""
    from collections import Counter

    from spp_detect.evaluation.report import evaluate_detections

    found = dict(done)
    stage_seconds: Counter = Counter()
    for rank_dets, _, times in gathered:
        found.update({k: Detections.from_dict(v) for k, v in rank_dets.items()})
        stage_seconds.update(times)
    dets = {r.image_id: found[r.image_id] for r in dataset.records}
    # The ranks run side by side: the run took as long as its slowest rank.
    seconds = max(s for _, s, _ in gathered)
    save_file({k: d.to_dict() for k, d in dets.items()}, output_dir / "detections.pt")
    # VOC results files, metrics.json and pr_curves.png (the evaluation layer's one path).
    metrics = evaluate_detections(
        dataset, dets, output_dir=output_dir, use_07_metric=use_07_metric,
        coco=coco or hasattr(dataset, "coco_image_ids"),
    )  # fmt: skip
    n = max(1, len(dataset))
    metrics["images"] = len(dataset)
    metrics["processes"] = len(gathered)
    metrics["seconds_per_image"] = seconds / n
    metrics["stage_seconds_per_image"] = {k: v / n for k, v in stage_seconds.items()}
    metrics["method"] = detector.method
    metrics["classifier"] = detector.config.test.classifier
    atomic_write_json(output_dir / "metrics.json", metrics)
    logger.info("mAP %.4f (%s) on %d images", metrics["mAP"], metrics.get("metric"), len(dataset))
    return metrics
