"""Generate the toy VOC-format detection dataset (shapes on cluttered backgrounds).

    python tools/make_toy_voc.py --output data/toy_voc [--num-train 60] [--num-val 20]
        [--num-test 40] [--seed 0] [--min-size 200] [--max-size 400] [--overwrite]
        [--instance-split]

writes ``OUTPUT/VOC2007/{JPEGImages,Annotations,ImageSets/Main}`` (see
``spp_detect.datasets.toy_voc.make_toy_voc``); OUTPUT is then a ``--voc-root`` for
``tools/train_net.py`` and ``tools/test_net.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spp_detect.cli_common import non_negative_int, positive_int, run_user_command
from spp_detect.datasets.toy_shapes import TOY_CLASSES
from spp_detect.datasets.toy_voc import make_toy_voc


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, type=Path, help="VOCdevkit folder to write")
    p.add_argument("--num-train", type=positive_int, default=60, help="training images")
    p.add_argument("--num-val", type=non_negative_int, default=20, help="validation images")
    p.add_argument("--num-test", type=non_negative_int, default=40, help="test images")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--min-size", type=positive_int, default=200, help="smallest image side (px)")
    p.add_argument("--max-size", type=positive_int, default=400, help="largest image side (px)")
    p.add_argument(
        "--classes",
        nargs="+",
        default=list(TOY_CLASSES),
        choices=TOY_CLASSES,
        help="object classes to draw",
    )
    p.add_argument("--max-objects", type=positive_int, default=4, help="objects per image: 1..N")
    p.add_argument("--year", default="2007", help="writes OUTPUT/VOC<year>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument(
        "--instance-split",
        action="store_true",
        help="test objects are other instances (shape styles, textures, proportions) than "
        "training objects, plus unannotated distractor shapes; the split is in toy_voc.json",
    )
    return p


def main(args: argparse.Namespace) -> Path:
    """Write the dataset; prints and returns the VOCdevkit folder."""
    root = make_toy_voc(
        args.output,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        seed=args.seed,
        image_size=(args.min_size, args.max_size),
        classes=args.classes,
        max_objects=args.max_objects,
        year=args.year,
        overwrite=args.overwrite,
        instance_split=args.instance_split,
    )
    print(root)
    return root


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
