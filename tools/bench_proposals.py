#!/usr/bin/env python3
"""Selective search per ``proposals.resize_to``: seconds per image, ground-truth recall, windows.

For the first ``--num-images`` images of a VOC-format split, every ``--resize-to`` value is run
through the library's own ``proposals.selective_search`` (what ``ProposalCache.get`` calls for
training, testing and ``spp-detect detect``), in one process on one thread, the values taking
turns on each image so that a load change on a shared machine hits them alike. A ground-truth
box counts as recalled at IoU ``t`` when some proposal overlaps it with IoU >= ``t``
(``torchvision.ops.box_iou``; VOC ``difficult`` objects are left out unless
``--include-difficult``, as VOC's AP leaves them out).

Images whose longer side is at most a ``resize_to`` value are segmented at full size under it,
exactly as with ``resize_to=0``; such (image, value) pairs are computed once and shared (the
``resized`` column counts the images a value did downscale). ``s/img`` is wall-clock time;
``CPU s/img`` is this process's CPU time (``time.process_time``), which a busy shared machine
inflates much less: read it, and the ratios between rows, there.

    python tools/bench_proposals.py --voc-root ROOT --split test --num-images 30 \
        --resize-to 0 300 400 500 1000 2000 --output bench_proposals.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spp_detect.benchmark.machine import load_average, machine_info  # noqa: E402
from spp_detect.cli_common import run_user_command  # noqa: E402
from spp_detect.datasets.images import read_image  # noqa: E402
from spp_detect.datasets.voc import VOCDataset  # noqa: E402
from spp_detect.errors import UserInputError  # noqa: E402
from spp_detect.proposals.selective_search import selective_search  # noqa: E402
from spp_detect.proposals.settings import MODES, ProposalSettings  # noqa: E402

logger = logging.getLogger("bench_proposals")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voc-root", type=Path, required=True, help="the VOCdevkit folder")
    p.add_argument("--year", default="2007")
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=int, default=30, help="first N images of the split")
    p.add_argument(
        "--resize-to", type=int, nargs="+", default=[0, 500, 1000, 2000],
        help="proposals.resize_to values (0: never resize)",
    )  # fmt: skip
    p.add_argument("--mode", default="fast", choices=MODES, help="selective search mode")
    p.add_argument("--max-proposals", type=int, default=2000, help="window cap (0: all)")
    p.add_argument("--iou", type=float, nargs="+", default=[0.5, 0.7], help="recall thresholds")
    p.add_argument("--include-difficult", action="store_true", help="count difficult objects")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs on the first image")
    p.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    return p


def recalled(proposals: torch.Tensor, gt_boxes: torch.Tensor, thresholds: Sequence[float]):
    """Which ground-truth boxes some proposal covers.

    Args:
        proposals: Tensor[R, 4] xyxy in image pixels (R may be 0).
        gt_boxes: Tensor[G, 4] xyxy in the same frame.
        thresholds: T IoU thresholds.
    Returns:
        Tensor[T, G] bool: ``[t, g]`` is True when ``max_r IoU(gt g, proposal r) >= thresholds[t]``.
    """
    gt_boxes = gt_boxes.reshape(-1, 4).double()
    best = torch.zeros(gt_boxes.shape[0], dtype=torch.float64)
    if proposals.numel() and gt_boxes.shape[0]:
        best = box_iou(gt_boxes, proposals.reshape(-1, 4).double()).max(dim=1).values
    return best[None, :] >= torch.tensor(list(thresholds), dtype=torch.float64)[:, None]


def _working_side(longer_side: int, resize_to: int) -> int:
    """The longer side selective search segments at (see ``selective_search._segment``)."""
    return resize_to if resize_to and longer_side > resize_to else longer_side


def run_benchmark(
    dataset: VOCDataset,
    num_images: int,
    resize_values: Sequence[int],
    base: ProposalSettings,
    thresholds: Sequence[float],
    include_difficult: bool = False,
    warmup: int = 1,
) -> Dict[str, Any]:
    """Selective search with each ``resize_to`` on the first ``num_images`` of ``dataset``.

    Returns:
        ``{"rows": [...], "per_image": [...]}``: one row per ``resize_to`` value (mean and
        median seconds per image, recall per threshold, mean windows, images downscaled) and,
        per image, its size, ground-truth count and per-value seconds and window counts.
    """
    records = dataset.records[:num_images]
    per_value: Dict[int, Dict[str, List[Any]]] = {
        r: {"seconds": [], "cpu_seconds": [], "windows": [], "hits": [], "resized": []}
        for r in resize_values
    }
    per_image = []
    num_gt = 0
    for k, rec in enumerate(records):
        image = read_image(rec.path)
        h, w = image.shape[:2]
        keep = np.ones(len(rec.boxes), dtype=bool)
        if not include_difficult:
            keep = ~(rec.difficult | rec.crowd)
        gt = torch.from_numpy(rec.boxes[keep])
        num_gt += int(gt.shape[0])
        if k == 0:
            # First-call costs (OpenCV's lazy init) are not timed; the cheapest setting does.
            cheapest = min(resize_values, key=lambda r: _working_side(max(h, w), r))
            for _ in range(warmup):
                selective_search(image, base.replace(resize_to=cheapest))
        # Values that segment at the same size compute the same windows: run each size once.
        done: Dict[int, tuple] = {}
        entry: Dict[str, Any] = {"image_id": rec.image_id, "hw": [h, w], "gt": int(gt.shape[0])}
        for r in resize_values:
            side = _working_side(max(h, w), r)
            if side not in done:
                t0, c0 = time.perf_counter(), time.process_time()
                boxes = selective_search(image, base.replace(resize_to=r))
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                hits = recalled(torch.from_numpy(boxes), gt, thresholds).sum(dim=1)
                done[side] = (seconds, cpu, len(boxes), hits.tolist())
            seconds, cpu, n, hits = done[side]
            stats = per_value[r]
            stats["seconds"].append(seconds)
            stats["cpu_seconds"].append(cpu)
            stats["windows"].append(n)
            stats["hits"].append(hits)
            stats["resized"].append(side < max(h, w))
            entry[f"resize_{r}"] = {
                "seconds": round(seconds, 4),
                "cpu_seconds": round(cpu, 4),
                "windows": n,
            }
        per_image.append(entry)
        logger.info(
            "%d/%d %s (%dx%d): %s", k + 1, len(records), rec.image_id, w, h,
            ", ".join(f"{side}px {v[0]:.2f} s" for side, v in sorted(done.items())),
        )  # fmt: skip
    rows = []
    for r in resize_values:
        stats = per_value[r]
        hits = np.array(stats["hits"], dtype=np.int64).reshape(-1, len(thresholds)).sum(axis=0)
        row: Dict[str, Any] = {
            "resize_to": r,
            "images": len(records),
            "resized": int(sum(stats["resized"])),
            "seconds_mean": statistics.fmean(stats["seconds"]),
            "seconds_median": statistics.median(stats["seconds"]),
            "cpu_seconds_mean": statistics.fmean(stats["cpu_seconds"]),
            "windows_mean": statistics.fmean(stats["windows"]),
            "gt": num_gt,
        }
        for t, n_hit in zip(thresholds, hits.tolist()):
            row[f"recall@{t:g}"] = n_hit / num_gt if num_gt else float("nan")
        rows.append(row)
    return {"rows": rows, "per_image": per_image}


def markdown_table(rows: List[Dict[str, Any]], thresholds: Sequence[float]) -> str:
    head = ["resize_to", "resized", "s/img (mean)", "s/img (median)", "CPU s/img"]
    head += [f"recall@{t:g}" for t in thresholds] + ["windows/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for row in rows:
        cells = [
            str(row["resize_to"]) if row["resize_to"] else "0 (off)",
            f"{row['resized']}/{row['images']}",
            f"{row['seconds_mean']:.3f}",
            f"{row['seconds_median']:.3f}",
            f"{row['cpu_seconds_mean']:.3f}",
        ]
        cells += [f"{row[f'recall@{t:g}']:.3f}" for t in thresholds]
        cells.append(f"{row['windows_mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> Dict[str, Any]:
    import cv2

    # One process, one thread: what one proposal worker gets (compute._init_worker).
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    if args.num_images < 1:
        raise UserInputError(f"--num-images must be >= 1, got {args.num_images}")
    dataset = VOCDataset(args.voc_root, args.year, args.split)
    base = ProposalSettings(mode=args.mode, max_proposals=args.max_proposals)
    load_before = load_average()
    result = run_benchmark(
        dataset, args.num_images, args.resize_to, base, args.iou,
        include_difficult=args.include_difficult, warmup=args.warmup,
    )  # fmt: skip
    result = {
        "voc_root": str(args.voc_root),
        "split": args.split,
        "settings": base.to_dict(),
        "include_difficult": args.include_difficult,
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        **result,
    }
    print(markdown_table(result["rows"], args.iou))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
