#!/usr/bin/env python3
"""Time SPP-net (1 scale, 1 scale with SVD fc layers, 5 scales) against R-CNN per stage on the
same images, proposals and backbone; writes DIR/speed.json, speed.md and speed.png.

    python tools/speed_report.py --voc-root ROOT --year 2007 --split test --num-images N \
        --backbone zf5 [--proposals 2000] [--model M] [--rcnn-model M2] [--device cpu|cuda] \
        [--methods spp-1scale spp-1scale-svd spp-5scale rcnn] [--warmup 1] \
        [--rcnn-max-windows K] --output DIR [KEY=VALUE ...]

Every method gets the same windows, made with one ``ProposalSettings``: the model's (how it was
trained) unless ``--proposals`` or a ``proposals.KEY=VALUE`` override is given. Without model
files the heads are untrained: times only, no mAP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spp_detect.cli_common import add_bench_args, bench_from_args, run_user_command  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    return bench_from_args(args)


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
