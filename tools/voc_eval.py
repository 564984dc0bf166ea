"""Score Pascal VOC results files (``comp4_det_<split>_<class>.txt``) as the VOC devkit does.

    python tools/voc_eval.py --voc-root ROOT --year 2007 --split test --results DIR \
        [--use-07-metric | --no-use-07-metric] [--output DIR] [--coco]

Prints the per-class AP table and the mAP; writes ``metrics.json`` and ``pr_curves.png`` to
``--output`` (default: the results folder). A user error (missing file, malformed line, ...)
prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from spp_detect.cli_common import run_user_command
from spp_detect.datasets.voc import VOCDataset
from spp_detect.evaluation.plots import format_ap_table
from spp_detect.evaluation.report import evaluate_results_dir


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pascal VOC detection AP of results files", add_help=add_help
    )
    p.add_argument("--voc-root", required=True, help="VOCdevkit folder holding VOC<year>/")
    p.add_argument("--year", default="2007")
    p.add_argument("--split", default="test")
    p.add_argument(
        "--results",
        required=True,
        help="folder with comp4_det_<split>_<class>.txt, one file per class",
    )
    p.add_argument(
        "--use-07-metric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="11-point AP (default: by year: VOC2007-2009 11-point, 2010+ area)",
    )
    p.add_argument("--iou-thresh", type=float, default=0.5, help="VOCopts.minoverlap")
    p.add_argument(
        "--output",
        default=None,
        help="where metrics.json and pr_curves.png go (default: the results folder)",
    )
    p.add_argument("--coco", action="store_true", help="also report COCO AP via pycocotools")
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names (default: the 20 VOC classes, or the sorted names "
        "found in the annotations)",
    )
    p.add_argument("--table", choices=("plain", "markdown"), default="plain")
    return p


def main(args: argparse.Namespace) -> dict:
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    dataset = VOCDataset(args.voc_root, args.year, args.split, class_names=classes)
    metrics = evaluate_results_dir(
        dataset,
        args.results,
        output_dir=args.output or args.results,
        use_07_metric=args.use_07_metric,
        iou_thresh=args.iou_thresh,
        coco=args.coco,
    )
    print(format_ap_table(metrics, style=args.table))
    return metrics


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
