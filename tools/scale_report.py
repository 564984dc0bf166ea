#!/usr/bin/env python3
"""Measure how training and testing grow with the dataset and extrapolate to VOC and COCO;
writes DIR/scale.json, scale.md and scale.png (issue 10).

    python tools/scale_report.py --sizes 100 300 1000 --output DIR [--min-size 375]
        [--max-size 500] [--method spp] [--device cpu] [--weights imagenet] [--config FILE]
        [KEY=VALUE ...]

For each N, a toy VOC set of N training and N test images (500 x 375 by default) is trained
and tested on, each run in its own process. Without KEY=VALUE overrides the short
configuration ``spp_detect.benchmark.scale.DEFAULT_OVERRIDES`` is used (the package defaults
with two fine-tuning iterations per image); overrides given replace it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spp_detect.benchmark.scale import DEFAULT_OVERRIDES, run_scale_report  # noqa: E402
from spp_detect.cli_common import positive_int, run_user_command  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=positive_int, default=[100, 300, 1000],
                   help="numbers of training (and test) images")  # fmt: skip
    p.add_argument("--output", required=True, type=Path, help="report folder")
    p.add_argument("--min-size", type=positive_int, default=375, help="smallest image side")
    p.add_argument("--max-size", type=positive_int, default=500, help="largest image side")
    p.add_argument("--method", choices=("spp", "rcnn"), default="spp")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--weights", default="imagenet", help="'imagenet', 'none' or a file")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"config overrides (default: {' '.join(DEFAULT_OVERRIDES)})")  # fmt: skip
    return p


def main(args: argparse.Namespace) -> dict:
    """Run the report; returns it (also written to OUTPUT/scale.json)."""
    return run_scale_report(
        args.sizes,
        args.output,
        overrides=args.overrides or DEFAULT_OVERRIDES,
        config=args.config,
        method=args.method,
        device=args.device,
        weights=args.weights,
        image_size=(args.min_size, args.max_size),
        command=_command_line(args),
    )


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this report."""
    parts = ["python", "tools/scale_report.py", "--sizes", *map(str, args.sizes)]
    parts += ["--output", str(args.output), "--min-size", str(args.min_size)]
    parts += ["--max-size", str(args.max_size), "--method", args.method, "--device", args.device]
    parts += ["--weights", args.weights]
    if args.config:
        parts += ["--config", args.config]
    return shlex.join(parts + list(args.overrides))


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
