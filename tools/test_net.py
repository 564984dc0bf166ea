#!/usr/bin/env python3
"""Run a trained detector over a VOC or COCO-format set and evaluate it; writes OUT/metrics.json.

    python tools/test_net.py (--voc-root ROOT [--year 2007] [--split test] |
        --coco-json FILE --images DIR) --model DIR/model.pt --output OUT [--method spp|rcnn]
        [--classifier svm|softmax] [--device cpu|cuda] [--coco] [--resume]

Under ``torchrun --nproc-per-node K`` the images are sharded by rank and rank 0 evaluates
(README, "Several processes and machines").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spp_detect.cli_common import add_test_args, run_user_command, test_from_args  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_test_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    return test_from_args(args)


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
