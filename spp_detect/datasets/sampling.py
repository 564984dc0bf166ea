"""Fine-tuning samples: window labels from ground-truth overlap, and 25%-positive mini-batches.

SPP-net sec. 4.1 (as R-CNN and the SPP_net code ``spp_finetune_voc.m``): a window is a positive
of the class of its best-overlapping ground truth when that IoU is in [0.5, 1], a negative
(background) when it is in [0.1, 0.5), and unused below 0.1. Mini-batches hold 128 windows, 25%
of them (32) positives, drawn from a pool of windows of many images.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = [
    "WindowLabels",
    "label_windows",
    "add_gt_windows",
    "sample_minibatch",
    "BACKGROUND",
    "IGNORE",
]

# Label values: 0 is background, c + 1 is object class c, -1 is never sampled.
BACKGROUND = 0
IGNORE = -1


class WindowLabels(NamedTuple):
    """Result of ``label_windows`` (unpacks as ``labels, max_iou, matched_gt``).

    Attributes:
        labels (LongTensor[R]): 0 background, ``c + 1`` for class c, -1 ignore.
        max_iou (Tensor[R]): highest IoU with any ground truth (0 when there is none), float32.
        matched_gt (LongTensor[R]): index of that ground truth, -1 when the image has none.
    """

    labels: Tensor
    max_iou: Tensor
    matched_gt: Tensor


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be Tensor[N, 4] xyxy, got shape {tuple(boxes.shape)}")


def add_gt_windows(windows: Tensor, gt_boxes: Tensor) -> Tensor:
    """Tensor[G + R, 4]: the ground-truth boxes first, then the windows (R-CNN trains on both).

    Args:
        windows (Tensor[R, 4]), gt_boxes (Tensor[G, 4]): xyxy in pixels of one image.
    """
    _check_boxes(windows, "windows")
    _check_boxes(gt_boxes, "gt_boxes")
    return torch.cat([gt_boxes.to(windows), windows], dim=0)


def label_windows(
    windows: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    fg_thresh: float = 0.5,
    bg_thresh_hi: float = 0.5,
    bg_thresh_lo: float = 0.1,
) -> WindowLabels:
    """Fine-tuning labels of one image's windows (SPP-net sec. 4.1).

    Args:
        windows (Tensor[R, 4]): xyxy in pixels of the image (include the ground truths with
            ``add_gt_windows`` to train on them, as R-CNN does).
        gt_boxes (Tensor[G, 4]): xyxy, same frame.
        gt_labels (LongTensor[G]): 0-based classes.
        fg_thresh: positive when the best IoU is ``>= fg_thresh`` (0.5).
        bg_thresh_hi, bg_thresh_lo: background when ``bg_thresh_lo <= IoU < bg_thresh_hi``
            ([0.1, 0.5)). Everything else (IoU < 0.1, or between the two ranges if they leave a
            gap) is -1. IoU is computed in float64, so hand-made boxes hit the bounds exactly.
    Returns:
        ``WindowLabels(labels, max_iou, matched_gt)`` on the device of ``windows``.
    """
    _check_boxes(windows, "windows")
    _check_boxes(gt_boxes, "gt_boxes")
    if gt_labels.shape != (gt_boxes.shape[0],):
        raise ValueError(
            f"gt_labels must be LongTensor[{gt_boxes.shape[0]}], got {tuple(gt_labels.shape)}"
        )
    if not bg_thresh_lo <= bg_thresh_hi <= fg_thresh:
        raise ValueError(
            f"need bg_thresh_lo <= bg_thresh_hi <= fg_thresh, got {bg_thresh_lo}, "
            f"{bg_thresh_hi}, {fg_thresh}"
        )
    dev = windows.device
    r = windows.shape[0]
    if gt_boxes.shape[0] == 0:
        max_iou64 = torch.zeros(r, dtype=torch.float64, device=dev)
        matched = torch.full((r,), -1, dtype=torch.long, device=dev)
    else:
        iou = box_iou(windows.double(), gt_boxes.to(dev).double())  # [R, G]
        max_iou64, matched = iou.max(dim=1)
    labels = torch.full((r,), IGNORE, dtype=torch.long, device=dev)
    bg = (max_iou64 >= bg_thresh_lo) & (max_iou64 < bg_thresh_hi)
    labels[bg] = BACKGROUND
    fg = max_iou64 >= fg_thresh
    if bool(fg.any()):
        labels[fg] = gt_labels.to(dev)[matched[fg]] + 1
    return WindowLabels(labels, max_iou64.float(), matched)


def sample_minibatch(
    labels: Tensor,
    batch_size: int = 128,
    fg_fraction: float = 0.25,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Indices of one fine-tuning mini-batch drawn from a pool of labelled windows.

    SPP-net / R-CNN: 128 windows, 25% positives (``round(0.25 * 128) = 32``), the rest
    background, drawn without replacement from the pool (windows of one or many images
    concatenated; keep an image id per window to find each one's image).

    Args:
        labels (LongTensor[P]): pool labels from ``label_windows`` (> 0 positive, 0 background,
            -1 never sampled).
        batch_size: windows per batch (128).
        fg_fraction: at most this share are positives (0.25); fewer when the pool has fewer.
        generator: torch RNG (CPU) for reproducible draws.
    Returns:
        LongTensor[B] on the device of ``labels``: positives first, then background, each in
        random order. ``B = n_fg + n_bg`` with ``n_fg = min(round(fg_fraction * batch_size),
        #positives)`` and ``n_bg = min(batch_size - n_fg, #background)``: the rest is filled
        with background only, so a pool short of background gives a batch smaller than
        ``batch_size`` (never extra positives, never repeats).
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be LongTensor[P], got shape {tuple(labels.shape)}")
    if batch_size < 1 or not 0.0 <= fg_fraction <= 1.0:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= fg_fraction <= 1, got {batch_size}, {fg_fraction}"
        )
    cpu_labels = labels.detach().cpu()
    fg = torch.nonzero(cpu_labels > 0).flatten()
    bg = torch.nonzero(cpu_labels == BACKGROUND).flatten()
    n_fg = min(int(round(fg_fraction * batch_size)), fg.numel())
    n_bg = min(batch_size - n_fg, bg.numel())
    fg = fg[torch.randperm(fg.numel(), generator=generator)[:n_fg]]
    bg = bg[torch.randperm(bg.numel(), generator=generator)[:n_bg]]
    return torch.cat([fg, bg]).to(labels.device)
