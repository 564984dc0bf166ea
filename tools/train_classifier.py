"""Train an SPP-net classifier on an ImageFolder dataset and test it on full images and crops.

    python tools/train_classifier.py --data data/toy_cls --output runs/cls_single --sizes 224
    python tools/train_classifier.py --data data/toy_cls --output runs/cls_multi --sizes 224 180

writes ``OUTPUT/metrics.json`` (top-1 / top-5 on full test images and on centre crops) and
``OUTPUT/model.pth``, and prints the table (see ``spp_detect.training.image_classification``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from spp_detect.cli_common import positive_int, run_user_command
from spp_detect.training.classifier_eval import format_metrics_table
from spp_detect.training.image_classification import ClassifierTrainConfig, train_classifier


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root: train/, test/")
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument("--backbone", default="zf5", help="zf5, efficientnet_lite0, vgg16, alexnet")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ImageNet backbone weights (default: where they exist, i.e. not for zf5)",
    )
    p.add_argument("--weights", type=Path, default=None, help="backbone weights file instead")
    p.add_argument("--out-stride", type=int, default=None, help="efficientnet_lite0: 8, 16, 32")
    p.add_argument("--freeze-backbone", action="store_true", help="train only fc6, fc7, scores")
    p.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=[224],
        help="224 (single) or 224 180 (multi)",
    )
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--levels", type=int, nargs="+", default=[6, 3, 2, 1], help="SPP levels")
    p.add_argument("--hidden", type=positive_int, default=4096, help="fc6 / fc7 width")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--workers", type=int, default=0, help="data loading processes")
    p.add_argument(
        "--full-min-side",
        type=int,
        default=None,
        help="full-image test: resize the short side to this (paper: 256; default: native size)",
    )
    p.add_argument("--verbose", action="store_true")
    return p


def main(args: argparse.Namespace) -> Dict[str, Any]:
    pretrained = str(args.weights) if args.weights is not None else args.pretrained
    kwargs = {} if args.out_stride is None else {"out_stride": args.out_stride}
    cfg = ClassifierTrainConfig(
        data=str(args.data),
        output=str(args.output),
        backbone=args.backbone,
        pretrained=pretrained,
        backbone_kwargs=kwargs,
        freeze_backbone=args.freeze_backbone,
        sizes=tuple(args.sizes),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        levels=tuple(args.levels),
        hidden=args.hidden,
        dropout=args.dropout,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        full_min_side=args.full_min_side,
    )
    metrics = train_classifier(cfg)
    print(format_metrics_table(metrics))
    return metrics


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
