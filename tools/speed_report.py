#!/usr/bin/env python3
"""Time SPP-net (1 and 5 scales) against R-CNN per stage on the same images, windows and backbone.

    python tools/speed_report.py --voc-root ROOT --year 2007 --split test --num-images N \
        --backbone zf5 --proposals 2000 [--model M] [--rcnn-model M2] [--device cpu|cuda] \
        [--methods spp-1scale spp-1scale-svd spp-5scale rcnn] [--warmup 1] [--rcnn-max-windows K] \
        --output DIR [KEY=VALUE ...]

writes DIR/speed.json, DIR/speed.md and DIR/speed.png (see spp_detect.engine.benchmark).
KEY=VALUE overrides set the configuration of fresh detectors, e.g. model.hidden=1024.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spp_detect.cli_common import UserError, run_user_command  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voc-root", required=True, type=Path, help="VOCdevkit folder")
    p.add_argument("--year", default="2007", help="VOC year (VOC<year> folder)")
    p.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt")
    p.add_argument("--num-images", type=int, default=10, help="the first N images of the split")
    p.add_argument("--backbone", default="zf5", help="zf5, efficientnet_lite0, vgg16, alexnet")
    p.add_argument("--proposals", type=int, default=2000, help="at most this many windows")
    p.add_argument("--model", type=Path, default=None, help="trained SPP-net model.pt")
    p.add_argument("--rcnn-model", type=Path, default=None, help="trained R-CNN model.pt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--methods", nargs="+", default=["spp-1scale", "spp-1scale-svd", "spp-5scale", "rcnn"],
        choices=["spp-1scale", "spp-1scale-svd", "spp-5scale", "rcnn"],
        help="methods to time (spp-1scale-svd: fc6/fc7 by truncated SVD, Fast R-CNN's ranks)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per method")
    p.add_argument(
        "--rcnn-max-windows", type=int, default=0,
        help="time R-CNN on the first K windows and extrapolate linearly (0: all windows)",
    )  # fmt: skip
    p.add_argument("--single-scale", type=int, nargs="+", default=[688], help="spp-1scale scale")
    p.add_argument(
        "--five-scales", type=int, nargs="+", default=[480, 576, 688, 864, 1200],
        help="spp-5scale scales",
    )  # fmt: skip
    p.add_argument(
        "--weights", default="auto",
        help="backbone weights without --model: auto (ImageNet if any, else random), "
        "imagenet, none, or a file",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--config", type=Path, default=None, help="YAML config file")
    p.add_argument("--cache-dir", type=Path, default=None, help="proposal cache folder")
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def main(args: argparse.Namespace) -> dict:
    # Cheap checks first: a typo fails in a second, before torch is imported.
    if not args.voc_root.is_dir():
        raise UserError(f"{args.voc_root}: VOC root folder not found")
    for flag, path in (("--model", args.model), ("--rcnn-model", args.rcnn_model)):
        if path is not None and not path.is_file():
            raise UserError(f"{flag} {path}: model file not found")
    if args.weights not in ("auto", "imagenet", "none") and not Path(args.weights).is_file():
        raise UserError(f"{args.weights}: weights file not found")

    import torch

    from spp_detect.config import load_config
    from spp_detect.engine.benchmark import SpeedSettings, run_speed_report

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + [
        f"model.backbone={args.backbone}",
        f"proposals.max_proposals={args.proposals}",
    ]
    return run_speed_report(
        args.voc_root,
        args.output,
        year=args.year,
        split=args.split,
        config=load_config(args.config, overrides),
        settings=SpeedSettings(
            methods=tuple(args.methods),
            num_images=args.num_images,
            warmup=args.warmup,
            rcnn_max_windows=args.rcnn_max_windows,
            single_scale=tuple(args.single_scale),
            five_scales=tuple(args.five_scales),
        ),
        model=args.model,
        rcnn_model=args.rcnn_model,
        device=args.device,
        weights=args.weights,
        cache_dir=args.cache_dir,
    )


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
