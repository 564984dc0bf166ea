"""Write the toy classification set (ImageFolder layout: train/ and test/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spp_detect.cli_common import positive_int, run_user_command
from spp_detect.datasets.toy_cls import make_toy_cls
from spp_detect.datasets.toy_shapes import TOY_CLASSES


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, type=Path, help="dataset root folder")
    parser.add_argument(
        "--num-train", type=positive_int, default=40, help="training images per class"
    )
    parser.add_argument("--num-test", type=positive_int, default=20, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--classes", nargs="+", default=list(TOY_CLASSES), help=f"subset of {TOY_CLASSES}"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply image sizes by this")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(args: argparse.Namespace) -> Path:
    return make_toy_cls(
        args.output, args.num_train, args.num_test, args.seed, args.classes, args.scale
    )


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
