"""The SVM + box-regression pass's checkpoints (``svm_bbox``): what the pass depends on
(``stage_key``), where each process keeps its checkpoint (``svm_checkpoint_path``), and the
periodic, atomic writer (``SVMStageCheckpoint``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

from spp_detect import distributed as dist
from spp_detect.config import DetectorConfig
from spp_detect.serialization import load_file, save_file
from spp_detect.training.conv_cache import weights_digest
from spp_detect.training.finetune import TrainingImage

__all__ = ["SVMStageCheckpoint", "stage_key", "svm_checkpoint_path"]

logger = logging.getLogger(__name__)

# Bump when the checkpoint's layout changes: older checkpoints are ignored (3: the regression
# samples' features spilled to snapshot files).
_CHECKPOINT_VERSION = 3


def stage_key(
    detector,
    images: Sequence[TrainingImage],
    config: DetectorConfig,
    classes: Optional[Sequence[int]] = None,
) -> str:
    """What the SVMs and regressors of ``classes`` (None: all) depend on: the fine-tuned
    head's and the backbone's weights, every training window and ground truth, and the
    settings that reach this stage (not ``svm.checkpoint_seconds``, which changes when, not
    what)."""
    h = hashlib.blake2b(digest_size=16)
    for im in images:
        h.update(im.record.image_id.encode() + b"|" + str(im.record.flipped).encode())
        for t in (im.windows, im.gt_boxes, im.gt_labels):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    svm = dataclasses.asdict(config.svm)
    svm.pop("checkpoint_seconds")
    backbone = getattr(detector, "backbone", None)
    fields = dict(
        version=_CHECKPOINT_VERSION,
        head=weights_digest(detector.head),
        backbone=weights_digest(backbone) if backbone is not None else None,
        windows=h.hexdigest(),
        svm=svm,
        bbox_reg=dataclasses.asdict(config.bbox_reg),
        model=dataclasses.asdict(config.model),
        feature_cache_dtype=config.feature_cache_dtype,
        seed=config.finetune.seed,
        classes=None if classes is None else [int(c) for c in classes],
    )
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class SVMStageCheckpoint:
    """The periodic checkpoint of the SVM + box-regression pass (detectron2 / fvcore
    ``PeriodicCheckpointer``), written atomically through ``serialization.save_file``.

    Args:
        path: the checkpoint file (None: no checkpoints).
        key: ``stage_key(...)``; a file with another key is ignored.
        every_seconds: minimum time between writes (0: after every image).
        extra: a folder of files the checkpoint refers to (the spilled regression samples'
            snapshots), removed with it.
    """

    def __init__(
        self,
        path: Optional[Union[str, Path]],
        key: str,
        every_seconds: float,
        extra: Optional[Path] = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.key, self.every = key, float(every_seconds)
        self.extra = extra  # a folder the checkpoint refers to (removed with it)
        self._last = time.monotonic()

    def load(self) -> Optional[Dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = load_file(self.path, what="SVM training checkpoint")
        except ValueError as exc:
            logger.warning("%s; SVM training starts over", exc)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            logger.info("%s: made with other inputs; SVM training starts over", self.path)
            return None
        return state

    def maybe_save(self, state_fn, force: bool = False) -> None:
        if self.path is None:
            return
        if force or time.monotonic() - self._last >= self.every:
            save_file(dict(state_fn(), key=self.key), self.path)
            self._last = time.monotonic()

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        if self.extra is not None:
            shutil.rmtree(self.extra, ignore_errors=True)


def svm_checkpoint_path(output_dir: Union[str, Path]) -> Path:
    """This process's checkpoint of the pass: ``svm_bbox.ckpt.pt``; under torchrun
    ``svm_bbox.rank<R>-of-<K>.ckpt.pt``, so a killed rank resumes its own classes."""
    if not dist.is_distributed():
        return Path(output_dir) / "svm_bbox.ckpt.pt"
    return Path(output_dir) / f"svm_bbox.rank{dist.rank()}-of-{dist.world_size()}.ckpt.pt"
