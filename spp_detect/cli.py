"""The ``spp-detect`` command: detection on image folders, the demo, and the tools' commands.

    spp-detect detect --model M --input PATH --output DIR [--score-thresh T] [--jobs N]
        [--resume] ...
    spp-detect demo [--output DIR] [--quick]
    spp-detect train ...   (= tools/train_net.py)
    spp-detect eval ...    (= tools/test_net.py)
    spp-detect bench ...   (= tools/speed_report.py)

Several processes (``spp_detect.distributed``): ``torchrun --standalone --nproc-per-node K -m
spp_detect.cli detect ...`` (or ``torchrun ... $(which spp-detect) detect ...``) shards the
images by rank; ``train`` and ``eval`` work the same way.

Each subcommand parses its arguments and makes one library call; ``train``, ``eval`` and
``bench`` share their argument sets and calls with the tools (``spp_detect.cli_common``).
Exit codes: 0 success; 1 a readable image the detector failed on (``detect``), or a bug (with
its traceback); 2 bad arguments or input (one line on stderr, no traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import __version__
from .cli_common import (
    add_bench_args,
    add_test_args,
    add_train_args,
    bench_from_args,
    positive_int,
    run_user_command,
    test_from_args,
    train_from_args,
)
from .datasets.images import DEFAULT_MAX_PIXELS

__all__ = ["get_args_parser", "main"]


# --------------------------------------------------------------------------------------------
# detect


def add_detect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model.pt from training")
    p.add_argument(
        "--input", required=True, help="image folder (recursive), one image, or a glob ('a/*.jpg')"
    )
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument(
        "--score-thresh",
        type=float,
        default=None,
        help="keep detections scoring above this; default: 0 for SVM margins (the SVMs' "
        "decision boundary), 0.5 for softmax probabilities",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--proposals", choices=["fast", "quality"], default=None, help="selective search mode"
    )
    p.add_argument(
        "--max-proposals", type=positive_int, default=None, help="windows per image (model: 2000)"
    )
    p.add_argument("--scales", type=positive_int, nargs="+", default=None, help="test scales")
    p.add_argument(
        "--proposals-file",
        type=Path,
        default=None,
        help="precomputed proposals (.npz or R-CNN .mat, keyed by file stem) instead of "
        "selective search",
    )
    p.add_argument(
        "--save-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write annotated copies to OUTPUT/images (default: on)",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="worker processes reading images and running selective search ahead of the "
        "network (default 1: inline)",
    )
    p.add_argument(
        "--exist-ok", action="store_true", help="start afresh in an existing output folder"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an earlier run in OUTPUT: images already in OUTPUT/detections.jsonl "
        "are skipped (same model and settings required)",
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip larger images (default {DEFAULT_MAX_PIXELS:,})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true")


def detect_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    from spp_detect.inference.folder import detect_folder, format_summary

    proposals = None
    if args.proposals_file is not None:
        from .proposals.files import load_proposals_file

        proposals = load_proposals_file(args.proposals_file)
    summary = detect_folder(
        args.model,
        args.input,
        args.output,
        score_thresh=args.score_thresh,
        device=args.device,
        proposal_mode=args.proposals,
        max_proposals=args.max_proposals,
        scales=args.scales,
        save_images=args.save_images,
        jobs=args.jobs,
        exist_ok=args.exist_ok,
        max_pixels=args.max_pixels,
        progress=not args.no_progress,
        proposals=proposals,
        resume=args.resume,
    )
    from .distributed import is_main_process

    if is_main_process():  # under torchrun every rank has rank 0's summary; one prints it
        print(format_summary(summary))
    return summary


def _detect_exit_code(summary: Dict[str, Any]) -> int:
    # 0 when every readable image was processed; unreadable files are reported, not failures.
    return 1 if summary.get("failed") else 0


# --------------------------------------------------------------------------------------------
# demo


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=Path, default=Path("spp_demo"), help="output folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--num-train", type=positive_int, default=None, help="toy training images (40; quick: 16)"
    )
    p.add_argument(
        "--num-test", type=positive_int, default=None, help="toy test images (20; quick: 8)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: fewer images, proposals, iterations"
    )
    p.add_argument("--seed", type=int, default=0, help="toy dataset seed")
    p.add_argument(
        "--score-thresh",
        type=float,
        default=-0.5,
        help="detect stage threshold on the SVM margin (default -0.5)",
    )
    p.add_argument(
        "--bench-images", type=int, default=2, help="images in the R-CNN speed comparison (0: skip)"
    )
    p.add_argument(
        "--rcnn-max-windows",
        type=int,
        default=32,
        help="R-CNN is timed on this many windows per image and extrapolated",
    )
    p.add_argument("--verbose", action="store_true")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides of configs/toy.yaml"
    )


def demo_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    from spp_detect.demo import format_demo_report, run_demo

    summary = run_demo(
        args.output,
        device=args.device,
        num_train=args.num_train,
        num_test=args.num_test,
        quick=args.quick,
        seed=args.seed,
        score_thresh=args.score_thresh,
        bench_images=args.bench_images,
        rcnn_max_windows=args.rcnn_max_windows,
        overrides=args.overrides,
    )
    print(format_demo_report(summary))
    return summary


# --------------------------------------------------------------------------------------------
# the command


_COMMANDS: Dict[str, tuple] = {
    # name: (add arguments, run, one-line help)
    "detect": (add_detect_args, detect_from_args, "detect objects in a folder of images"),
    "demo": (add_demo_args, demo_from_args, "the whole pipeline on a generated toy dataset"),
    "train": (add_train_args, train_from_args, "train a detector (= tools/train_net.py)"),
    "eval": (add_test_args, test_from_args, "test and evaluate a model (= tools/test_net.py)"),
    "bench": (add_bench_args, bench_from_args, "SPP-net vs R-CNN speed (= tools/speed_report.py)"),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spp-detect",
        description="SPP-net object detection (He et al., 2014): detect, demo, train, eval, bench",
    )
    parser.add_argument("--version", action="version", version=f"spp_detect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, _, help_text) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``spp-detect``; returns the exit code (argparse errors give 2, ``--help`` 0)."""
    parser = get_args_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    run: Callable[[argparse.Namespace], Any] = _COMMANDS[args.command][1]
    return run_user_command(run, args, _detect_exit_code if args.command == "detect" else None)


if __name__ == "__main__":
    sys.exit(main())
