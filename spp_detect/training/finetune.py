"""Stage 1 of detector training: fine-tune fc6, fc7 and the new (K+1)-way cls_score on pooled
window features (SPP-net sec. 4.1; the conv layers stay frozen)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from spp_detect.config import FinetuneConfig
from spp_detect.datasets.records import ImageRecord
from spp_detect.datasets.sampling import label_windows, sample_minibatch

__all__ = ["TrainingImage", "make_training_images", "finetune_head", "num_iterations"]

logger = logging.getLogger(__name__)

# Images whose windows set the fc6 input scale.
_INPUT_SCALE_IMAGES = 20


@dataclass
class TrainingImage:
    """One training image's windows: its ground truths first, then its proposals.

    Attributes:
        record: the annotation (boxes in original-image pixels).
        windows (Tensor[R, 4]): xyxy in original-image pixels.
        gt_boxes (Tensor[G, 4]), gt_labels (LongTensor[G]): non-difficult ground truth (the
            training rule of R-CNN and py-faster-rcnn: difficult objects are left out).
        labels (LongTensor[R]): fine-tuning labels, 0 = background, c + 1 = class c, -1 = unused.
    """

    record: ImageRecord
    windows: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    labels: Tensor


def make_training_images(
    records: Sequence[ImageRecord], proposals: Dict[str, np.ndarray], cfg: FinetuneConfig
) -> List[TrainingImage]:
    """Ground truth + proposals per image, labelled by the fine-tuning IoU rules."""
    out = []
    for rec in records:
        keep = ~rec.difficult
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


def finetune_head(
    detector,
    source,
    images: Sequence[TrainingImage],
    cfg: FinetuneConfig,
) -> List[Dict[str, float]]:
    """SGD on fc6, fc7 and cls_score with mini-batches of 128 windows, 25% positives.

    Each mini-batch draws its windows from ``cfg.images_per_batch`` random images (R-CNN and
    SPP_net sample windows from many images at once, which keeps a batch diverse).

    Args:
        detector: a ``WindowDetector``; only ``detector.head`` is trained.
        source: training window features, prepared on ``images``
            (``rows(i, idx, rng) -> Tensor[len(idx), D]``).
        images: from ``make_training_images``.
    Returns:
        The log: one dict per logged interval (iteration, lr, loss, accuracy, seconds).
    """
    usable = [i for i, im in enumerate(images) if bool((im.labels >= 0).any())]
    if not usable:
        raise ValueError("no training windows: every image lacks positives and negatives")
    iterations = num_iterations(cfg, len(images))
    step_at = int(iterations * cfg.step_fraction)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head = detector.head
    device = detector.device
    opt = torch.optim.SGD(
        head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sample = torch.cat(
        [
            source.rows(i, torch.arange(min(64, images[i].windows.shape[0])))
            for i in usable[:_INPUT_SCALE_IMAGES]
        ]
    )
    logger.info("fc6 input scale %.4g", head.set_input_scale(sample))
    head.train()
    log: List[Dict[str, float]] = []
    run_loss = run_acc = 0.0
    run_n = 0
    t0 = time.perf_counter()
    log_every = max(1, iterations // 20)
    bar = tqdm(range(iterations), desc="fine-tune fc6/fc7/cls_score", unit="it", leave=False)
    for it in bar:
        if it == step_at and step_at > 0:
            # lr 1e-4 -> 1e-5 after 250k of 300k mini-batches (sec. 4.1).
            for group in opt.param_groups:
                group["lr"] = cfg.lr * cfg.lr_step_factor
        chosen = rng.choice(usable, size=min(cfg.images_per_batch, len(usable)), replace=False)
        pool_labels = torch.cat([images[i].labels for i in chosen])
        owner = torch.cat(
            [
                torch.full((images[i].labels.numel(),), k, dtype=torch.long)
                for k, i in enumerate(chosen)
            ]
        )
        offsets = torch.cat([torch.arange(images[i].labels.numel()) for i in chosen])
        picked = sample_minibatch(
            pool_labels, batch_size=cfg.batch_size, fg_fraction=cfg.fg_fraction, generator=gen
        )
        feats, targets = [], []
        for k, i in enumerate(chosen):
            sel = picked[owner[picked] == k]
            if sel.numel():
                feats.append(source.rows(int(i), offsets[sel], rng))
                targets.append(pool_labels[sel])
        x = torch.cat(feats).to(device)
        y = torch.cat(targets).to(device)
        _, logits = head(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run_loss += loss.item() * y.numel()
        run_acc += float((logits.argmax(1) == y).sum())
        run_n += y.numel()
        if (it + 1) % log_every == 0 or it + 1 == iterations:
            entry = {
                "iteration": it + 1,
                "lr": opt.param_groups[0]["lr"],
                "loss": run_loss / run_n,
                "accuracy": run_acc / run_n,
                "seconds": time.perf_counter() - t0,
            }
            log.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", acc=f"{entry['accuracy']:.2f}")
            logger.info(
                "fine-tune it %d/%d lr %.1e loss %.4f acc %.3f",
                it + 1,
                iterations,
                entry["lr"],
                entry["loss"],
                entry["accuracy"],
            )
            run_loss = run_acc = 0.0
            run_n = 0
    head.eval()
    return log
