"""Detector training, stage by stage (SPP-net sec. 4.1; R-CNN's recipe):

1. proposals for every training image (cached on disk);
2. conv features (SPP-net: conv maps; R-CNN: pooled windows), cached on disk;
3. fine-tuning of fc6, fc7 and a new (K+1)-way cls_score;
4. per-class linear SVMs on fc7 with hard negative mining, and per-class box regressors on the
   pooled conv features (one pass over the images);
5. one self-contained ``model.pt``.

Each finished stage leaves a checkpoint in the output folder, so a rerun with the same settings
resumes after it.

Under ``torchrun`` every rank runs ``train_detector``: fine-tuning is data-parallel (DDP,
``finetune.py``), the SVMs and regressors are divided by class (``svm_bbox.py``), and rank 0
alone writes ``finetune.pt``, ``model.pt`` and ``train_log.json`` while the others wait for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from spp_detect import distributed as dist
from spp_detect.config import DEFAULT_LR, DetectorConfig
from spp_detect.datasets.voc import VOCDataset
from spp_detect.modeling.build import build_detector
from spp_detect.serialization import load_file, save_file
from spp_detect.utils import atomic_write_json, resolve_device
from spp_detect.training.conv_cache import weights_digest
from spp_detect.training.sample_store import spill_folder
from spp_detect.training.svm_bbox import svm_checkpoint_path, train_svms_and_regressors
from spp_detect.training.window_features import memory_budget
from spp_detect.inference.dataset import dataset_proposals
from spp_detect.datasets.records import ImageRecord, mirror_boxes
from spp_detect.errors import UserInputError
from spp_detect.modeling.backbones import build_imagenet_model
from spp_detect.modeling.head import load_imagenet_fc
from spp_detect.training.distill import distill_head
from spp_detect.training.head_stats import head_response_stats
from spp_detect.training.finetune import TrainingImage, finetune_head, make_training_images
from spp_detect.training.finetune_checkpoint import FinetuneCheckpoint

__all__ = ["train_detector", "make_feature_source"]

logger = logging.getLogger(__name__)


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_feature_source(detector, cache_dir: Path):
    """The training feature source of a detector's method."""
    if detector.method == "spp":
        from spp_detect.training.conv_cache import ConvFeatureCache
        from spp_detect.training.window_features import SPPWindowFeatures

        # The conv maps' LRU takes its share of the budget (it was a fixed 2 GiB, outside it:
        # the scale report's fine-tuning peak grew with the cache up to that); the pooled
        # windows get the rest. Values never depend on either.
        budget = memory_budget(detector.config.memory_budget_mb)
        lru = budget // CONV_LRU_SHARE
        cache = ConvFeatureCache(
            cache_dir / "conv_features", detector, dtype=detector.config.feature_cache_dtype,
            memory_bytes=lru,
        )  # fmt: skip
        return SPPWindowFeatures(
            detector,
            cache,
            random_scale=detector.config.finetune.random_scale,
            memory_bytes=budget - lru,
        )
    from spp_detect.training.rcnn_features import RCNNWindowFeatures

    return RCNNWindowFeatures(
        detector,
        cache_dir / "rcnn_features",
        dtype=detector.config.feature_cache_dtype,
        memory_bytes=memory_budget(detector.config.memory_budget_mb),
    )


# Share of the training memory budget (memory_budget_mb) that the conv maps' LRU may hold:
# on-demand pooling reads each image's map once per pool refill and the SVM pass once per
# image, so a small LRU loses little (the maps of a 1,000-image set take 455 MB on disk).
CONV_LRU_SHARE = 8

# The config sections that determine the fine-tuned head (its checkpoint's key).
_FINETUNE_INPUTS = ("model", "data", "proposals", "distill", "finetune", "feature_cache_dtype")
# Backbones whose whole ImageNet network (with a classifier) can teach fc6/fc7.
_HAS_IMAGENET_CLASSIFIER = ("efficientnet_lite0", "vgg16", "alexnet")


def resolve_fc_init(config: DetectorConfig, pretrained: Union[bool, str]) -> str:
    """``distill.fc_init`` with "auto" resolved: "distill" where the backbone has ImageNet
    weights and a classifier, else "random"."""
    fc_init = config.distill.fc_init
    name = config.model.backbone
    if fc_init not in ("auto", "random", "distill", "imagenet"):
        raise UserInputError(
            f"distill.fc_init must be auto, random, distill or imagenet, got {fc_init!r}"
        )
    if fc_init == "auto":
        usable = name in _HAS_IMAGENET_CLASSIFIER and pretrained is not False
        return "distill" if usable else "random"
    if fc_init != "random" and (name not in _HAS_IMAGENET_CLASSIFIER or pretrained is False):
        raise UserInputError(
            f"distill.fc_init={fc_init} needs ImageNet weights of efficientnet_lite0, vgg16 or "
            f"alexnet (backbone {name!r}, pretrained={pretrained!r})"
        )
    if fc_init == "imagenet" and name == "efficientnet_lite0":
        raise UserInputError("distill.fc_init=imagenet: efficientnet_lite0 has no fc6/fc7")
    return fc_init


def init_fc_layers(detector, source, images, config, pretrained, cache_dir, log) -> str:
    """Give fc6/fc7 their starting point (``distill.fc_init``); returns the resolved choice."""
    fc_init = resolve_fc_init(config, pretrained)
    log["fc_init"] = fc_init
    if fc_init == "random":
        return fc_init
    teacher = build_imagenet_model(config.model.backbone, pretrained=pretrained)
    teacher = teacher.to(detector.device)
    if fc_init == "imagenet":
        cls = teacher.model.classifier  # torchvision: Dropout?, fc6, ReLU, Dropout, fc7, ...
        fc6, fc7 = [m for m in cls if isinstance(m, torch.nn.Linear)][:2]
        m = config.model
        load_imagenet_fc(detector.head, fc6, fc7, m.levels, detector.backbone.out_channels)
        return fc_init
    with _timed(log, "distill"):
        log["distill"] = distill_head(
            detector, source, images, config.distill, teacher, Path(cache_dir) / "teacher"
        )
    return fc_init


class _FinetuneStage:
    """fc6/fc7 initialisation and fine-tuning, resumable: ``finetune.pt`` holds the finished
    head (reused when its key matches), ``finetune.ckpt.pt`` the periodic checkpoint of an
    unfinished run (continued when its key matches). Under torchrun rank 0 reads and writes
    ``finetune.pt`` and copies a reused head to the other ranks."""

    def __init__(self, output_dir: Path, key: str, resume: bool) -> None:
        self.done_path = output_dir / "finetune.pt"
        self.ckpt_path = output_dir / "finetune.ckpt.pt"
        self.key, self.resume = key, resume
        if not resume:
            self.ckpt_path.unlink(missing_ok=True)

    def _finished(self) -> Optional[Dict[str, Any]]:
        if not (self.resume and self.done_path.is_file()):
            return None
        saved = load_file(self.done_path, what="fine-tuning result")
        return saved if isinstance(saved, dict) and saved.get("key") == self.key else None

    def run(self, detector, source, images, flipped, config, pretrained, cache_dir, log) -> None:
        saved = self._finished() if dist.is_main_process() else None
        reused_log = dist.broadcast(None if saved is None else saved["log"])
        if reused_log is not None:
            if saved is not None:
                detector.head.load_state_dict(saved["head"])
            dist.broadcast_module(detector.head)
            logger.info("fine-tuning: reusing %s", self.done_path)
            log["finetune"] = reused_log
            return
        ckpt = FinetuneCheckpoint(self.ckpt_path, self.key, config.finetune.checkpoint_seconds)
        if ckpt.load() is not None:  # an interrupted run: its head already has its start
            fc_init = resolve_fc_init(config, pretrained)
        else:
            fc_init = init_fc_layers(detector, source, images, config, pretrained, cache_dir, log)
        if not config.finetune.enabled:
            log["finetune"] = []
            return
        ft_cfg = config.finetune
        if ft_cfg.lr <= 0:  # by where fc6/fc7 start (config.DEFAULT_LR)
            ft_cfg = dataclasses.replace(ft_cfg, lr=DEFAULT_LR[fc_init])
        log["finetune_lr"] = ft_cfg.lr
        log["finetune"] = finetune_head(
            detector, source, images + flipped, ft_cfg, fc_init == "random", ckpt
        )
        if dist.is_main_process():
            head = detector.head.state_dict()
            save_file({"key": self.key, "head": head, "log": log["finetune"]}, self.done_path)
            self.ckpt_path.unlink(missing_ok=True)


def training_images(
    records: Sequence[ImageRecord], proposals: Dict[str, np.ndarray], config: DetectorConfig
) -> Tuple[List[TrainingImage], List[TrainingImage]]:
    """The training images, and their horizontal mirrors when ``data.flip`` (the SPP_net code
    fine-tunes on trainval plus its mirror images; the SVMs and regressors train on the
    originals, as in R-CNN). Mirrored windows are the mirrored proposals of the original."""
    use_difficult = config.data.use_difficult
    images = make_training_images(records, proposals, config.finetune, use_difficult)
    if not config.data.flip:
        return images, []
    mirrored = [r.mirrored() for r in records]
    mirrored_props = {
        m.image_id: mirror_boxes(proposals[r.image_id], r.width) for r, m in zip(records, mirrored)
    }
    return images, make_training_images(mirrored, mirrored_props, config.finetune, use_difficult)


def _new_log(dataset, method: str, device: torch.device) -> Dict[str, Any]:
    if len(dataset) == 0:
        raise UserInputError(f"{dataset.root}: split {dataset.split!r} has no images")
    return {
        "method": method,
        "dataset": {
            "root": str(dataset.root),
            "year": dataset.year,
            "split": dataset.split,
            "images": len(dataset),
        },
        "class_names": dataset.class_names,
        "device": str(device),
        "processes": dist.world_size(),
        "seconds": {},
        # Each stage's [start, end] on time.perf_counter's clock (system-wide on Linux), so
        # that a process watching this one can attribute what it measured to the stages.
        "clock": {},
    }


@contextlib.contextmanager
def _timed(log: Dict[str, Any], stage: str) -> Iterator[None]:
    """Record the block's seconds and clock interval under ``stage`` in ``log``."""
    start = time.perf_counter()
    yield
    end = time.perf_counter()
    log["seconds"][stage] = end - start
    log.setdefault("clock", {})[stage] = [start, end]


def finetune_key(method: str, config: DetectorConfig, dataset, proposals, backbone) -> str:
    """What determines the fine-tuned head, and nothing else (not the SVM, test or worker
    settings): the method, the config sections of ``_FINETUNE_INPUTS``, the classes, every
    annotation, the proposals (which follow the image content through the proposal cache's
    content key) and all backbone weights."""
    cfg = config.to_dict()
    h = hashlib.sha256()
    for rec in dataset.records:
        h.update(rec.image_id.encode() + b"\0")
        for arr in (rec.boxes, rec.labels, rec.difficult, rec.crowd, proposals[rec.image_id]):
            h.update(np.ascontiguousarray(arr).tobytes())
    return _digest(
        [
            method,
            {k: cfg[k] for k in _FINETUNE_INPUTS},
            dataset.class_names,
            h.hexdigest(),
            weights_digest(backbone),
        ]
    )


def train_detector(
    dataset: VOCDataset,
    output_dir: Union[str, Path],
    config: DetectorConfig,
    method: str = "spp",
    device: Optional[str] = None,
    pretrained: Union[bool, str] = True,
    cache_dir: Optional[Union[str, Path]] = None,
    proposals_file: Optional[Union[str, Path]] = None,
    resume: bool = True,
) -> Dict[str, Any]:
    """Train a detector on a VOC-format split and write ``output_dir/model.pt``.

    Args:
        dataset: the training split (its ``class_names`` become the model's classes).
        output_dir: where ``model.pt``, stage checkpoints and ``train_log.json`` go.
        config: all settings (paper defaults).
        method: ``"spp"`` (SPP-net) or ``"rcnn"`` (the per-region baseline).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when present).
        pretrained: backbone weights: ``True`` (ImageNet), ``False`` (random) or a file.
        cache_dir: proposal and feature caches (default ``output_dir/cache``); share it between
            runs and methods to reuse proposals.
        proposals_file: precomputed proposals (.npz or .mat) instead of selective search.
        resume: reuse finished stages whose settings match.
    Returns:
        The training log (per-stage seconds, cache sizes, fine-tuning losses, model path).

    Under torchrun every rank calls it with the same arguments (``tools/train_net.py`` does,
    after ``shared_caches.fill_caches_by_rank``); rank 0 writes the files.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else output_dir / "cache"
    dev = resolve_device(device)
    torch.manual_seed(config.finetune.seed)
    log = _new_log(dataset, method, dev)
    # Build the detector (and so load and check the weights) before any expensive stage.
    detector = build_detector(method, dataset.class_names, config, pretrained=pretrained).to(dev)
    resolve_fc_init(config, pretrained)
    with _timed(log, "proposals"):
        proposals = dataset_proposals(dataset, config, cache_dir, proposals_file)
    log["proposals_per_image"] = float(
        sum(len(proposals[r.image_id]) for r in dataset.records) / len(dataset)
    )
    source = make_feature_source(detector, cache_dir)
    images, flipped = training_images(dataset.records, proposals, config)
    with _timed(log, "features"):
        log["feature_cache"] = source.prepare(images + flipped)

    with _timed(log, "finetune"):
        ft_key = finetune_key(method, config, dataset, proposals, detector.backbone)
        stage = _FinetuneStage(output_dir, ft_key, resume)
        stage.run(detector, source, images, flipped, config, pretrained, cache_dir, log)

    with _timed(log, "svm_bbox"):
        detector.eval()
        svm_ckpt = svm_checkpoint_path(output_dir)  # continued by a rerun after a kill
        if not resume:
            svm_ckpt.unlink(missing_ok=True)
            shutil.rmtree(spill_folder(svm_ckpt), ignore_errors=True)
        detector.svms, detector.bbox_regressor, stats = train_svms_and_regressors(
            detector, source, images, config, checkpoint_path=svm_ckpt
        )
        log["classifiers"] = stats

    model_path = output_dir / "model.pt"
    log["model"] = str(model_path)
    with dist.all_ranks_ok("writing model.pt"):  # no rank leaves before rank 0 has written
        if dist.is_main_process():
            # For test.svd_method="responses" (modeling/lowrank.py): seconds; kept in model.pt.
            with _timed(log, "head_stats"):
                detector.head_stats = head_response_stats(
                    detector.head, source, images, seed=config.finetune.seed
                )
            detector.save(model_path)
            atomic_write_json(output_dir / "train_log.json", log)
            logger.info("wrote %s", model_path)
    return log
