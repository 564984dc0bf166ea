"""Argument sets shared by ``tools/*.py`` and the ``spp-detect`` subcommands, so that both are
the same thin layer over one library call each."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict

__all__ = [
    "setup_logging",
    "run_user_command",
    "add_train_args",
    "train_from_args",
    "add_test_args",
    "test_from_args",
    "UserError",
]


class UserError(ValueError):
    """A problem with the user's input: reported in one line, exit code 2, no traceback."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_user_command(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run ``main(args)``; user errors (``ValueError``, missing files) print one line and give
    exit code 2 instead of a traceback."""
    setup_logging(getattr(args, "verbose", False))
    try:
        main(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (finished stages and caches are kept)", file=sys.stderr)
        return 130
    return 0


def _add_voc_args(parser: argparse.ArgumentParser, split: str) -> None:
    parser.add_argument("--voc-root", required=True, type=Path, help="VOCdevkit folder")
    parser.add_argument("--year", default="2007", help="VOC year (VOC<year> folder)")
    parser.add_argument("--split", default=split, help="ImageSets/Main/<split>.txt")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="proposal/feature caches")
    parser.add_argument(
        "--proposals-file",
        type=Path,
        default=None,
        help="precomputed proposals (.npz or R-CNN .mat) instead of selective search",
    )
    parser.add_argument("--verbose", action="store_true")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    _add_voc_args(parser, "trainval")
    parser.add_argument("--output", required=True, type=Path, help="output folder (model.pt)")
    parser.add_argument("--method", default="spp", choices=["spp", "rcnn"])
    parser.add_argument("--backbone", default=None, help="zf5, efficientnet_lite0, vgg16, alexnet")
    parser.add_argument(
        "--scales", type=int, nargs="+", default=None, help="e.g. 688 or 480 576 688 864 1200"
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    parser.add_argument(
        "--weights", default=None, help="backbone weights: 'imagenet' (default), 'none' or a file"
    )
    parser.add_argument("--no-resume", action="store_true", help="recompute finished stages")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. finetune.lr=0.001"
    )


def _pretrained(weights: str | None) -> Any:
    if weights in (None, "imagenet"):
        return True
    if weights == "none":
        return False
    if not Path(weights).is_file():
        raise UserError(f"{weights}: weights file not found")
    return weights


def train_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    from .config import load_config
    from .datasets.voc import VOCDataset
    from .engine.train import train_detector

    overrides = list(args.overrides)
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    if args.scales:
        overrides.append(f"model.scales=[{','.join(map(str, args.scales))}]")
    config = load_config(args.config, overrides)
    dataset = VOCDataset(args.voc_root, year=args.year, split=args.split)
    return train_detector(
        dataset,
        args.output,
        config,
        method=args.method,
        device=args.device,
        pretrained=_pretrained(args.weights),
        cache_dir=args.cache_dir,
        proposals_file=args.proposals_file,
        resume=not args.no_resume,
    )


def add_test_args(parser: argparse.ArgumentParser) -> None:
    _add_voc_args(parser, "test")
    parser.add_argument("--model", required=True, type=Path, help="model.pt from training")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--method",
        choices=["spp", "rcnn"],
        default=None,
        help="expected method (the model file records it)",
    )
    parser.add_argument("--classifier", choices=["svm", "softmax"], default=None)
    parser.add_argument("--no-bbox-reg", action="store_true", help="skip box regression")
    parser.add_argument("--scales", type=int, nargs="+", default=None, help="test scales")
    parser.add_argument("--use-07-metric", dest="use_07_metric", action="store_true", default=None)
    parser.add_argument("--no-use-07-metric", dest="use_07_metric", action="store_false")
    parser.add_argument("--coco", action="store_true", help="also COCO-style AP (pycocotools)")


def test_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    import dataclasses

    from .datasets.voc import VOCDataset
    from .engine.inference import test_detector
    from .modeling.detector import load_detector
    from .utils import resolve_device

    detector = load_detector(args.model, resolve_device(args.device))
    if args.method and args.method != detector.method:
        raise UserError(f"{args.model}: a {detector.method!r} model, not {args.method!r}")
    test_overrides: Dict[str, Any] = {}
    if args.classifier:
        test_overrides["classifier"] = args.classifier
    if args.no_bbox_reg:
        test_overrides["bbox_reg"] = False
    if args.scales:
        detector.config = detector.config.replace(
            model=dataclasses.replace(detector.config.model, scales=tuple(args.scales))
        )
    dataset = VOCDataset(
        args.voc_root, year=args.year, split=args.split, class_names=detector.class_names
    )
    metrics = test_detector(
        detector,
        dataset,
        args.output,
        device=args.device,
        cache_dir=args.cache_dir,
        proposals_file=args.proposals_file,
        use_07_metric=args.use_07_metric,
        coco=args.coco,
        overrides=test_overrides,
    )
    from .evaluation.plots import format_ap_table

    print(format_ap_table(metrics))
    return metrics
