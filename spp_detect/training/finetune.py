"""Stage 1 of detector training: fine-tune fc6, fc7 and the new (K+1)-way cls_score on pooled
window features (SPP-net sec. 4.1; the conv layers stay frozen).

Mini-batches follow the SPP_net code (``spp_finetune_voc.m``): 32 foreground and 96 background
windows drawn uniformly from the windows of the whole training set. Features are fetched for
``pool_batches`` mini-batches at once (a pool spanning many images, as the released code fills a
pool with 10x the windows it needs), so each image's features are read once per refill.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from spp_detect.config import FinetuneConfig
from spp_detect.datasets.records import ImageRecord
from spp_detect.datasets.sampling import BACKGROUND, label_windows
from spp_detect import distributed as dist
from spp_detect.training.finetune_checkpoint import (
    FinetuneCheckpoint,
    rank_seed,
    rank_state,
    restore_rank_state,
)

__all__ = [
    "TrainingImage",
    "WindowPool",
    "make_training_images",
    "finetune_head",
    "num_iterations",
]

logger = logging.getLogger(__name__)

# Images whose windows set the fc6 input scale.
_INPUT_SCALE_IMAGES = 20


@dataclass
class TrainingImage:
    """One training image's windows: its ground truths first, then its proposals.

    Attributes:
        record: the annotation (boxes in original-image pixels).
        windows (Tensor[R, 4]): xyxy in original-image pixels.
        gt_boxes (Tensor[G, 4]), gt_labels (LongTensor[G]): the ground truth used for training
            (difficult objects included unless ``use_difficult=False``, see
            ``make_training_images``).
        labels (LongTensor[R]): fine-tuning labels, 0 = background, c + 1 = class c, -1 = unused.
    """

    record: ImageRecord
    windows: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    labels: Tensor


def make_training_images(
    records: Sequence[ImageRecord],
    proposals: Dict[str, np.ndarray],
    cfg: FinetuneConfig,
    use_difficult: bool = True,
) -> List[TrainingImage]:
    """Ground truth + proposals per image, labelled by the fine-tuning IoU rules.

    Args:
        records: annotations; ``proposals[record.image_id]`` holds float32 ``[R, 4]`` windows.
        use_difficult: keep difficult objects as positives and regression targets (R-CNN's
            ``rcnn_train.m`` and the SPP_net code do); False drops them (py-faster-rcnn), which
            also makes windows on them background of their own class. Crowd regions
            (``record.crowd``, COCO ``iscrowd=1``) are never targets.
    """
    out = []
    for rec in records:
        # COCO crowd regions are never targets (detectron2 / torchvision drop iscrowd boxes).
        keep = ~rec.crowd if use_difficult else ~rec.crowd & ~rec.difficult
        gt_boxes = torch.from_numpy(rec.boxes[keep]).float()
        gt_labels = torch.from_numpy(rec.labels[keep]).long()
        props = torch.as_tensor(np.asarray(proposals[rec.image_id]), dtype=torch.float32)
        windows = torch.cat([gt_boxes, props.reshape(-1, 4)], dim=0)
        labels, _, _ = label_windows(
            windows,
            gt_boxes,
            gt_labels,
            fg_thresh=cfg.fg_thresh,
            bg_thresh_hi=cfg.bg_thresh_hi,
            bg_thresh_lo=cfg.bg_thresh_lo,
        )
        out.append(TrainingImage(rec, windows, gt_boxes, gt_labels, labels))
    return out


def num_iterations(cfg: FinetuneConfig, num_images: int) -> int:
    """Mini-batches to run: ``cfg.iterations``, or 300k scaled by images (250k + 50k on VOC07)."""
    if cfg.iterations > 0:
        return int(cfg.iterations)
    return max(1, int(round(cfg.iters_per_image * num_images)))


class WindowPool:
    """Mini-batches drawn uniformly from every labelled window of the training set.

    Each mini-batch has ``n_fg = round(fg_fraction * batch_size)`` foreground windows (fewer
    when the training set has fewer) and ``batch_size - n_fg`` background windows, each drawn
    without replacement within the batch from all windows of that kind in all images (so a batch
    spans many images: 32 positives are rarely near-duplicates of one object).

    Args:
        images: from ``make_training_images``.
        source: training window features (``rows(i, idx, rng) -> Tensor[len(idx), D]``).
        cfg: batch_size, fg_fraction, pool_batches.
        rng, generator: numpy RNG (random scale per window) and torch RNG (the draws).
    """

    def __init__(self, images, source, cfg: FinetuneConfig, rng, generator) -> None:
        owner = torch.cat(
            [torch.full((im.labels.numel(),), i, dtype=torch.long) for i, im in enumerate(images)]
        )
        index = torch.cat([torch.arange(im.labels.numel()) for im in images])
        labels = torch.cat([im.labels for im in images])
        self.fg = torch.nonzero(labels > 0).flatten()
        self.bg = torch.nonzero(labels == BACKGROUND).flatten()
        if self.fg.numel() == 0 and self.bg.numel() == 0:
            raise ValueError("no training windows: every image lacks positives and negatives")
        self.owner, self.index, self.labels = owner, index, labels
        self.source, self.cfg, self.rng, self.gen = source, cfg, rng, generator
        self.n_fg = min(int(round(cfg.fg_fraction * cfg.batch_size)), self.fg.numel())
        self.n_bg = min(cfg.batch_size - self.n_fg, self.bg.numel())

    def draw(self) -> Tensor:
        """Global window ids of one mini-batch: foreground first, then background."""
        fg = self.fg[torch.randperm(self.fg.numel(), generator=self.gen)[: self.n_fg]]
        bg = self.bg[torch.randperm(self.bg.numel(), generator=self.gen)[: self.n_bg]]
        return torch.cat([fg, bg])

    def features(self, ids: Tensor) -> Tensor:
        """Tensor[len(ids), D]: pooled features of global window ids, one read per image."""
        out = None
        owners = self.owner[ids]
        for i in torch.unique(owners).tolist():
            sel = torch.nonzero(owners == i).flatten()
            rows = self.source.rows(int(i), self.index[ids[sel]], self.rng)
            if out is None:
                out = rows.new_empty(ids.numel(), rows.shape[1])
            out[sel.to(rows.device)] = rows
        return out

    def batches(self, pool_batches: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """Endless ``(features, labels)`` mini-batches, fetched ``pool_batches`` at a time.

        The draws are made in the same order whatever ``pool_batches`` is, so the mini-batches
        (and, at one scale, their features) do not depend on it: it trades memory for reads.
        """
        while True:
            drawn = [self.draw() for _ in range(max(1, pool_batches))]
            feats = self.features(torch.cat(drawn))
            start = 0
            for ids in drawn:
                yield feats[start : start + ids.numel()], self.labels[ids]
                start += ids.numel()


def pool_batches(cfg: FinetuneConfig, source) -> int:
    """Mini-batches fetched per refill of the ``WindowPool``: ``cfg.pool_batches`` (the
    released code's 10x pool), or, when the source pools windows on demand from the conv cache
    (its pooled windows exceed the memory budget), as many as its budget holds: a refill reads
    each image's conv map once for all of that image's windows in the pool, so a pool of
    ``P`` windows over ``M`` images costs ``min(P, M)`` map reads, and at VOC size (10,022
    images with mirrors) a 10-batch pool would read ~1,280 maps every 10 iterations."""
    n = max(1, int(cfg.pool_batches))
    room = int(getattr(source, "on_demand_pool_windows", 0) or 0)
    return max(n, room // max(1, cfg.batch_size))


def _set_input_scale(head, source, images: Sequence[TrainingImage]) -> None:
    """The fc6 input scale from the first images' windows, measured on rank 0 and broadcast
    (every rank holds the same float32 value)."""
    scale = None
    if dist.is_main_process():
        usable = [i for i, im in enumerate(images) if bool((im.labels >= 0).any())]
        rows = [
            source.rows(i, torch.arange(min(64, images[i].windows.shape[0])))
            for i in usable[:_INPUT_SCALE_IMAGES]
        ]
        scale = head.set_input_scale(torch.cat(rows))
    head.input_scale.fill_(dist.broadcast(scale))
    logger.info("fc6 input scale %.4g", float(head.input_scale))


def finetune_head(
    detector,
    source,
    images: Sequence[TrainingImage],
    cfg: FinetuneConfig,
    set_input_scale: bool = True,
    checkpoint: Optional[FinetuneCheckpoint] = None,
) -> List[Dict[str, float]]:
    """SGD on fc6, fc7 and cls_score: mini-batches of 128 windows, 25% positives, drawn from
    the whole training set (``WindowPool``); lr steps by ``lr_step_factor`` after
    ``step_fraction`` of the iterations (sec. 4.1: 1e-4 for 250k, then 1e-5 for 50k).

    Under torchrun (K ranks): data-parallel SGD with ``DistributedDataParallel``. Each rank
    draws its own mini-batches from the whole training set (``WindowPool`` and dropout seeded
    by ``(seed, rank)``; rank 0 by one process's seed) and DDP averages the gradients: an
    effective batch of K x 128 windows at the configured lr (not scaled with K), for the same
    number of iterations. The fc6 input scale is measured on rank 0 and broadcast; the log
    covers every rank's windows.

    Args:
        detector: a ``WindowDetector``; only ``detector.head`` is trained.
        source: training window features, prepared on ``images``.
        images: from ``make_training_images``.
        set_input_scale: set the fc6 input scale from the data (fc6/fc7 from random init);
            False keeps the one that came with pretrained or distilled fc6/fc7.
        checkpoint: periodic checkpoints; a run killed at any point and started again with
            the same inputs and number of ranks ends with the head of an uninterrupted one.
    Returns:
        The log: one dict per logged interval (iteration, lr, loss, accuracy, seconds).
    """
    # The schedule follows the dataset, not its mirror images (SPP_net: 300k on VOC07 trainval).
    iterations = num_iterations(cfg, sum(not im.record.flipped for im in images))
    seed = rank_seed(cfg.seed, dist.rank())
    if dist.rank() > 0:
        torch.manual_seed(seed)  # dropout masks of its own (rank 0: one process's stream)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    pool = WindowPool(images, source, cfg, rng, gen)
    head, device = detector.head, detector.device
    opt, sched = _optimizer(head, cfg, iterations)
    if set_input_scale:
        _set_input_scale(head, source, images)
    saved = checkpoint.load() if checkpoint is not None else None
    run = _Run(log=[], totals=np.zeros(3), start=0)
    if saved is not None:
        run = _restore(saved, head, opt, sched, rng, gen, device)
        logger.info("fine-tuning: resuming at iteration %d from %s", run.start, checkpoint.path)

    def shared_state() -> Dict[str, Any]:
        return {
            "iteration": it + 1,
            "head": head.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "log": run.log,
        }

    model = _data_parallel(head, device)
    head.train()
    t0 = time.perf_counter()
    log_every, pool_size = max(1, iterations // 20), pool_batches(cfg, source)
    logger.info("fine-tuning: %d mini-batches per refill of the window pool", pool_size)
    batches = pool.batches(pool_size)
    bar = tqdm(
        range(run.start, iterations), desc="fine-tune fc6/fc7/cls_score", unit="it",
        leave=False, disable=not dist.is_main_process(),
    )  # fmt: skip
    for it in bar:
        x, y = next(batches)
        lr = opt.param_groups[0]["lr"]
        _sgd_step(model, opt, sched, x.to(device), y.to(device), run.totals)
        if (it + 1) % log_every == 0 or it + 1 == iterations:
            _log_interval(run, it + 1, iterations, lr, time.perf_counter() - t0, bar)
        if checkpoint is not None:
            checkpoint.maybe_save(
                shared_state,
                lambda: rank_state(rng, gen, run.totals, device),
                at_boundary=(it + 1 - run.start) % pool_size == 0,
            )
    del model  # DDP's gradient hooks go with it
    head.eval()
    return run.log


def _optimizer(head, cfg: FinetuneConfig, iterations: int):
    """SGD with momentum and weight decay, and its one lr step (sec. 4.1)."""
    opt = torch.optim.SGD(
        head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    step_at = int(iterations * cfg.step_fraction)
    milestones = [step_at] if 0 < step_at < iterations else []
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=cfg.lr_step_factor)


def _data_parallel(head: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``head`` wrapped in ``DistributedDataParallel`` under torchrun (its construction copies
    rank 0's parameters and buffers to every rank), ``head`` itself in one process."""
    if not dist.is_distributed():
        return head
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if torch.device(device).type == "cuda" else None
    # Buffers (the fc6 input scale) are equal on every rank and never change while training.
    return DistributedDataParallel(head, device_ids=ids, broadcast_buffers=False)


@dataclass
class _Run:
    log: List[Dict[str, float]]
    totals: np.ndarray  # this rank's, since the last log entry: loss * n, correct, n
    start: int


def _restore(saved: Dict[str, Any], head, opt, sched, rng, gen, device) -> "_Run":
    """Put a checkpoint's head, optimizer, scheduler and this rank's RNG states back."""
    head.load_state_dict(saved["head"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    totals = restore_rank_state(saved["ranks"][dist.rank()], rng, gen, device)
    return _Run(log=list(saved["log"]), totals=totals, start=saved["iteration"])


def _sgd_step(model, opt, sched, x: Tensor, y: Tensor, totals: np.ndarray) -> None:
    _, logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    totals += (loss.item() * y.numel(), float((logits.argmax(1) == y).sum()), y.numel())


def _log_interval(run: _Run, iteration: int, iterations: int, lr: float, seconds: float, bar):
    t = np.sum(dist.all_gather(run.totals.tolist()), axis=0)  # every rank's windows
    entry = {"iteration": iteration, "lr": float(lr)}
    entry.update(loss=float(t[0] / t[2]), accuracy=float(t[1] / t[2]), seconds=float(seconds))
    run.log.append(entry)
    bar.set_postfix(loss=f"{entry['loss']:.3f}", acc=f"{entry['accuracy']:.2f}")
    logger.info(
        "fine-tune it %d/%d lr %.1e loss %.4f acc %.3f",
        *(iteration, iterations, lr, entry["loss"], entry["accuracy"]),
    )
    run.totals[:] = 0
