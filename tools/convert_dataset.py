#!/usr/bin/env python3
"""Convert a detection dataset between the VOC and COCO formats.

    python tools/convert_dataset.py voc2coco --voc-root ROOT [--year 2007] \
        [--split trainval test] --output DIR [--link symlink|hardlink|copy]
        -> DIR/annotations/instances_<split>.json + DIR/<split>/ per split
    python tools/convert_dataset.py coco2voc --coco-json FILE --images DIR --output ROOT \
        [--year 2007] [--split NAME] [--link symlink|hardlink|copy]
        -> ROOT/VOC<year>/{Annotations,JPEGImages,ImageSets/Main/<split>.txt}

The converted set is read by ``--coco-json FILE --images DIR`` or ``--voc-root ROOT`` of
``tools/train_net.py`` and ``tools/test_net.py`` (see ``spp_detect.datasets.convert``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spp_detect.cli_common import run_user_command  # noqa: E402
from spp_detect.datasets.convert import IMAGE_MODES, coco_to_voc, voc_to_coco  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    v2c = sub.add_parser("voc2coco", help="VOC splits -> COCO instances JSON + image folder")
    v2c.add_argument("--voc-root", required=True, type=Path, help="VOCdevkit folder")
    v2c.add_argument("--year", default="2007", help="VOC year (VOC<year> folder)")
    v2c.add_argument(
        "--split", nargs="+", default=["trainval", "test"], help="ImageSets/Main/<split>.txt"
    )
    c2v = sub.add_parser("coco2voc", help="COCO instances JSON + image folder -> a VOC split")
    c2v.add_argument("--coco-json", required=True, type=Path, help="instances JSON")
    c2v.add_argument("--images", required=True, type=Path, help="folder of the file_names")
    c2v.add_argument("--year", default="2007", help="writes OUTPUT/VOC<year>")
    c2v.add_argument(
        "--split", default=None, help="split name (default: the JSON name without instances_)"
    )
    for p in (v2c, c2v):
        p.add_argument("--output", required=True, type=Path, help="folder to write")
        p.add_argument("--link", choices=IMAGE_MODES, default="symlink", help="how images go")
        p.add_argument("--verbose", action="store_true")
    return parser


def main(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Convert; returns one summary per split written."""
    if args.direction == "voc2coco":
        summaries = [
            voc_to_coco(args.voc_root, args.output, args.year, split, args.link)
            for split in args.split
        ]
    else:
        summaries = [
            coco_to_voc(args.coco_json, args.images, args.output, args.year, args.split, args.link)
        ]
    print(json.dumps(summaries, indent=2))
    return summaries


if __name__ == "__main__":
    sys.exit(run_user_command(main, get_args_parser().parse_args()))
