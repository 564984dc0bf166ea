"""Argument sets shared by ``tools/*.py`` and the ``spp-detect`` subcommands, so that both are
the same thin layer over one library call each."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .errors import UserInputError

__all__ = [
    "positive_int", "non_negative_int", "setup_logging", "run_user_command", "add_train_args",
    "train_from_args", "dataset_from_args", "add_test_args", "test_from_args", "add_bench_args",
    "bench_from_args",
]  # fmt: skip

# Operating-system errors about a path the user gave (a missing input, an existing output, a
# folder where a file was expected, no permission): the user's to fix, like UserInputError.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                  PermissionError)  # fmt: skip


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a bad value is a usage error, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (a bad value is a usage error, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def setup_logging(verbose: bool = False) -> None:
    # Under torchrun every line says which rank wrote it.
    world = os.environ.get("WORLD_SIZE", "1")
    where = f"[rank {os.environ.get('RANK', '0')}/{world}] " if world not in ("", "1") else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return " ".join(str(exc).split())


def run_user_command(
    main: Callable[[argparse.Namespace], Any],
    args: argparse.Namespace,
    result_code: Optional[Callable[[Any], int]] = None,
) -> int:
    """Run ``main(args)`` and return the exit code (on success ``result_code(result)`` if given).

    Under ``torchrun`` it runs inside ``distributed.process_group()`` (one rank per process),
    and the rank then ends with that code (``distributed.exit_rank``) instead of returning.
    0: success. 2: the user's mistake (``UserInputError``, or an ``OSError`` about a path in
    ``USER_OS_ERRORS``): one line on stderr, no traceback. 130: interrupted. 1: anything else,
    which is a bug: its traceback is printed (on the other ranks of a torchrun job: one line
    naming the rank that failed).
    """
    # Huge pages for torch's big CPU buffers: page faults were 24 of pooling's 31 ms, 6 with.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from .distributed import exit_rank, launched_ranks

    code = _run_logged(main, args, result_code)
    if launched_ranks():
        exit_rank(code)
    return code


def _run_logged(main: Callable, args: argparse.Namespace, result_code: Optional[Callable]) -> int:
    from .distributed import RankFailedError, process_group
    from .utils import limit_heap_growth

    setup_logging(getattr(args, "verbose", False))
    limit_heap_growth()  # peak RSS flat in the number of images (utils.limit_heap_growth)
    try:
        with process_group(getattr(args, "device", None)):
            result = main(args)
    except (UserInputError, *USER_OS_ERRORS) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except RankFailedError as exc:  # that rank printed its own traceback
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (finished stages and caches are kept)", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: show where it happened
        traceback.print_exc()
        print("error: internal error (a bug in spp_detect; traceback above)", file=sys.stderr)
        return 1
    return result_code(result) if result_code else 0


def _add_dataset_args(parser: argparse.ArgumentParser, split: str) -> None:
    data = parser.add_argument_group(
        "dataset", "a VOC split (--voc-root [--year] [--split]) or a COCO-format set "
        "(--coco-json FILE --images DIR)",
    )  # fmt: skip
    data.add_argument("--voc-root", type=Path, default=None, help="VOCdevkit folder")
    data.add_argument("--year", default=None, help="VOC year (VOC<year> folder; default 2007)")
    data.add_argument("--split", default=None, help=f"ImageSets/Main/<split>.txt (default {split})")
    data.add_argument("--coco-json", type=Path, default=None, help="COCO instances JSON")
    data.add_argument("--images", type=Path, default=None, help="image folder of --coco-json")
    parser.set_defaults(default_split=split)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="proposal/feature caches")
    parser.add_argument(
        "--proposals-file",
        type=Path,
        default=None,
        help="precomputed proposals (.npz or R-CNN .mat) instead of selective search",
    )
    parser.add_argument("--verbose", action="store_true")


def _check_dataset_args(args: argparse.Namespace) -> None:
    """One line for neither or both dataset formats, or half of the COCO pair."""
    voc = args.voc_root is not None
    coco = args.coco_json is not None or args.images is not None
    if voc == coco:
        raise UserInputError(
            "give exactly one dataset: --voc-root ROOT [--year Y] [--split S], or "
            "--coco-json FILE --images DIR"
        )
    if coco:
        if args.coco_json is None or args.images is None:
            missing = "--images DIR" if args.images is None else "--coco-json FILE"
            raise UserInputError(f"a COCO-format dataset needs both files: {missing} is missing")
        if args.year is not None or args.split is not None:
            raise UserInputError("--year and --split are VOC arguments; not with --coco-json")
        if not args.images.is_dir():
            raise UserInputError(f"{args.images}: image folder not found")


def dataset_from_args(args: argparse.Namespace, class_names=None):
    """The ``VOCDataset`` or ``COCODataset`` that ``_add_dataset_args`` arguments name.

    Raises:
        UserInputError: neither or both formats, or half of the COCO pair (``_check_dataset_args``).
    """
    _check_dataset_args(args)
    if args.coco_json is not None:
        from .datasets.coco import COCODataset

        return COCODataset(args.coco_json, args.images, class_names=class_names)
    from .datasets.voc import VOCDataset

    return VOCDataset(
        args.voc_root,
        year=args.year or "2007",
        split=args.split or args.default_split,
        class_names=class_names,
    )


def add_train_args(parser: argparse.ArgumentParser) -> None:
    _add_dataset_args(parser, "trainval")
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
        raise UserInputError(f"{weights}: weights file not found")
    return weights


def train_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    from . import distributed
    from .config import load_config
    from spp_detect.training.train import train_detector

    overrides = list(args.overrides)
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    if args.scales:
        overrides.append(f"model.scales=[{','.join(map(str, args.scales))}]")
    config = load_config(args.config, overrides)
    dataset = dataset_from_args(args)
    device = distributed.local_device(args.device)
    cache_dir = args.cache_dir if args.cache_dir is not None else args.output / "cache"
    if distributed.is_distributed():
        # Under torchrun the ranks fill the proposal and feature caches by shards, then all
        # train together: DDP fine-tuning, SVMs and regressors divided by class; rank 0
        # writes model.pt (training/train.py).
        from spp_detect.training.shared_caches import fill_caches_by_rank

        fill_caches_by_rank(
            dataset, config, args.method, cache_dir, device=device,
            pretrained=_pretrained(args.weights), proposals_file=args.proposals_file,
        )  # fmt: skip
    return train_detector(
        dataset,
        args.output,
        config,
        method=args.method,
        device=device,
        pretrained=_pretrained(args.weights),
        cache_dir=cache_dir,
        proposals_file=args.proposals_file,
        resume=not args.no_resume,
    )


def add_test_args(parser: argparse.ArgumentParser) -> None:
    _add_dataset_args(parser, "test")
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
    parser.add_argument(
        "--coco", action="store_true",
        help="also COCO-style AP (pycocotools; always with --coco-json)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the images an interrupted run into --output finished (OUTPUT/partial)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="test.KEY=VALUE",
                        help="test-time settings, e.g. test.fast_head=bf16")  # fmt: skip


def test_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    from . import distributed
    from spp_detect.inference.dataset import test_detector
    from .config import test_overrides as parse_test_overrides
    from .modeling.build import load_detector
    from .utils import resolve_device

    _check_dataset_args(args)  # a wrong pair fails before the model is read
    device = distributed.local_device(args.device)
    detector = load_detector(args.model, resolve_device(device))
    if args.method and args.method != detector.method:
        raise UserInputError(f"{args.model}: a {detector.method!r} model, not {args.method!r}")
    test_fields = parse_test_overrides(detector.config, getattr(args, "overrides", []))
    if args.classifier:
        test_fields["classifier"] = args.classifier
    if args.no_bbox_reg:
        test_fields["bbox_reg"] = False
    dataset = dataset_from_args(args, class_names=detector.class_names)
    metrics = test_detector(
        detector,
        dataset,
        args.output,
        device=device,
        cache_dir=args.cache_dir,
        proposals_file=args.proposals_file,
        use_07_metric=args.use_07_metric,
        coco=args.coco,
        overrides=test_fields,
        scales=args.scales,
        resume=args.resume,
    )
    from .evaluation.plots import format_ap_table

    if distributed.is_main_process():
        print(format_ap_table(metrics))
    return metrics


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """The speed report's arguments (``tools/speed_report.py``, ``spp-detect bench``)."""
    p = parser
    p.add_argument("--voc-root", required=True, type=Path, help="VOCdevkit folder")
    p.add_argument("--year", default="2007", help="VOC year (VOC<year> folder)")
    p.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt")
    p.add_argument("--num-images", type=int, default=10, help="the first N images of the split")
    p.add_argument("--backbone", default="zf5", help="zf5, efficientnet_lite0, vgg16, alexnet")
    p.add_argument(
        "--proposals", type=int, default=None,
        help="at most this many windows per image (default: as the --model was trained, "
        "else 2000); with it or a proposals.KEY=VALUE override, every proposal setting comes "
        "from the command line's configuration",
    )  # fmt: skip
    p.add_argument("--model", type=Path, default=None, help="trained SPP-net model.pt")
    p.add_argument("--rcnn-model", type=Path, default=None, help="trained R-CNN model.pt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--methods", nargs="+", default=["spp-1scale", "spp-1scale-svd", "spp-5scale", "rcnn"],
        choices=["spp-1scale", "spp-1scale-svd", "spp-1scale-fast", "spp-5scale", "rcnn"],
        help="methods to time (spp-1scale-svd: fc6/fc7 by truncated SVD, Fast R-CNN's ranks; "
        "spp-1scale-fast: every test-time speed option, given to R-CNN too, docs/speed.md)",
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


def bench_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """``benchmark.speed_report.run_speed_report`` from ``add_bench_args`` arguments."""
    # Cheap checks first: a typo fails in a second, before torch is imported.
    if not args.voc_root.is_dir():
        raise UserInputError(f"{args.voc_root}: VOC root folder not found")
    for flag, path in (("--model", args.model), ("--rcnn-model", args.rcnn_model)):
        if path is not None and not path.is_file():
            raise UserInputError(f"{flag} {path}: model file not found")
    if args.weights not in ("auto", "imagenet", "none") and not Path(args.weights).is_file():
        raise UserInputError(f"{args.weights}: weights file not found")

    import torch

    from .config import load_config
    from spp_detect.benchmark.speed_report import SpeedSettings, run_speed_report

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + [f"model.backbone={args.backbone}"]
    if args.proposals is not None:
        overrides.append(f"proposals.max_proposals={args.proposals}")
    config = load_config(args.config, overrides)
    # Proposal settings asked for on the command line apply to every method; otherwise the
    # report uses the model's own (how it was trained), or the defaults without a model.
    asked = args.proposals is not None or any(o.startswith("proposals.") for o in args.overrides)
    return run_speed_report(
        args.voc_root,
        args.output,
        year=args.year,
        split=args.split,
        config=config,
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
        proposals=config.proposals if asked else None,
    )
