"""The per-image loop of ``detect_folder``: images read ahead (``image_loader``), detected by the
``Predictor`` and handed one record at a time to ``FolderResults``; the run's totals."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .folder_results import IMAGES_DIR, FolderResults
from .image_loader import LoadedImage, LoadSettings, iter_loaded, one_line

__all__ = ["FolderLoop", "combine_totals"]

logger = logging.getLogger(__name__)


class FolderLoop:
    """Detects the loaded images one by one and hands each record to the results."""

    def __init__(self, predictor: Any, results: FolderResults, save_images: bool) -> None:
        from spp_detect.utils import StageTimer

        self.predictor, self.results, self.save_images = predictor, results, save_images
        self.class_names = list(predictor.class_names)
        self.timer = StageTimer(predictor.detector.device)
        self.n_dets = self.n_errors = 0

    def record(self, path: Path, name: str, loaded: LoadedImage) -> Dict[str, Any]:
        """One image's ``detections.jsonl`` record."""
        import torch

        for stage, sec in loaded.seconds.items():
            self.timer.times[stage] += sec
        if loaded.reason is not None:
            logger.debug("skipped %s: %s", path, loaded.reason)
            return {"file": name, "path": str(path), "reason": loaded.reason, "stage": loaded.stage}
        try:
            dets = self.predictor(loaded.image, loaded.proposals, timer=self.timer)
        except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
            # A readable image too large for the network's memory: reported, counted as a
            # failure (exit code 1), retried by a resumed run; the run goes on.
            logger.warning("detection failed on %s: %s", path, one_line(exc))
            reason = f"detection failed ({one_line(exc)})"
            return {"file": name, "path": str(path), "reason": reason, "stage": "detect"}
        image = loaded.image
        entry = {
            "file": name,
            "path": str(path),
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "detections": dets.to_list(self.class_names),
        }
        if self.save_images:
            from .visualize import annotated_name, draw_detections, save_image

            with self.timer("draw"):
                rel = Path(IMAGES_DIR) / annotated_name(name)
                drawn = draw_detections(image, dets, self.class_names)
                save_image(self.results.output_dir / rel, drawn)
            entry["annotated"] = rel.as_posix()
        self.n_dets += len(dets)
        return entry

    def totals(self, tasks: Sequence[Tuple[str, Optional[np.ndarray]]], seconds: float):
        """This run's figures for the summary."""
        return {
            "precomputed_proposals": sum(boxes is not None for _, boxes in tasks),
            "seconds": seconds,
            "stage_seconds": dict(self.timer.times),
            "device": str(self.predictor.detector.device),
        }

    def run(
        self,
        todo: Sequence[Tuple[Path, str]],
        tasks: Sequence[Tuple[str, Optional[np.ndarray]]],
        settings: LoadSettings,
        jobs: int,
        progress: bool,
    ) -> None:
        """Read ``tasks`` (the ``todo`` images) ahead, detect, and append each record."""
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="detect", unit="img", disable=not progress)
        with contextlib.closing(iter_loaded(tasks, settings, jobs)) as loaded_iter, bar:
            for (path, name), loaded in zip(todo, loaded_iter):
                rec = self.record(path, name, loaded)
                self.n_errors += "detections" not in rec
                self.results.add(rec)
                bar.update(1)
                bar.set_postfix(dets=self.n_dets, skipped=self.n_errors, refresh=False)


def combine_totals(totals: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The ranks' ``FolderLoop.totals`` as one run's: side by side, the run took as long as
    its slowest rank; stage times and counts add up."""
    stages: Dict[str, float] = {}
    for t in totals:
        for k, v in t["stage_seconds"].items():
            stages[k] = stages.get(k, 0.0) + v
    return {
        "precomputed_proposals": sum(t["precomputed_proposals"] for t in totals),
        "seconds": max(t["seconds"] for t in totals),
        "stage_seconds": stages,
        "device": totals[0]["device"],
    }
