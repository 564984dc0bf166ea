#!/usr/bin/env python3
"""Train an SPP-net (or R-CNN baseline) detector on a VOC or COCO-format set; writes DIR/model.pt.

    python tools/train_net.py (--voc-root ROOT [--year 2007] [--split trainval] |
        --coco-json FILE --images DIR) --output DIR \
        [--method spp|rcnn] [--backbone efficientnet_lite0] [--scales 688] [--device cpu|cuda] \
        [--config FILE] [KEY=VALUE ...]

Under ``torchrun --nproc-per-node K`` the ranks fill the proposal and feature caches by shards,
fine-tune with DDP and divide the SVM and regressor classes; rank 0 writes model.pt (README,
"Several processes and machines").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spp_detect.cli_common import add_train_args, run_user_command, train_from_args  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    return train_from_args(args)


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
