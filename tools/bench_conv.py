"""Benchmark the conv pass (SPP-net: one 688 x 917 image; R-CNN: a chunk of 224 x 224 crops) in
float32, channels_last, bfloat16 and (``--compile``) torch.compile, per backbone.

The variants take turns in every repeat (a shared machine's load hits all alike): read the
ratios to float32. ``max_err`` is ``max |y - y_f32| / max |y_f32|`` of the conv output.

    python tools/bench_conv.py --backbones zf5 efficientnet_lite0 --repeats 3 --output conv.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spp_detect.modeling.backbones import build_backbone  # noqa: E402
from spp_detect.modeling.fast_conv import fast_backbone  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["zf5", "efficientnet_lite0"])
    p.add_argument("--image-hw", type=int, nargs=2, default=[688, 917], help="SPP-net input")
    p.add_argument("--crops", type=int, default=64, help="R-CNN crops per chunk (crop_batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="also torch.compile (slow to build)")
    p.add_argument("--output", type=Path, default=None)
    return p


def _variants(backbone, compile_: bool) -> Dict[str, Callable]:
    v = {
        "f32": backbone,
        "channels_last": fast_backbone(backbone, "channels_last"),
        "bf16": fast_backbone(backbone, "bf16"),
    }
    if compile_:
        v["f32-compile"] = torch.compile(copy.deepcopy(backbone))
    return v


def _bench(variants: Dict[str, Callable], x: torch.Tensor, repeats: int) -> Dict[str, dict]:
    times: Dict[str, list] = {k: [] for k in variants}
    with torch.no_grad():
        ref = variants["f32"](x)
        err = {}
        for k, f in variants.items():  # also the warm-up
            y = f(x).float()
            err[k] = float((y - ref).abs().max() / ref.abs().max())
        for _ in range(repeats):
            for k, f in variants.items():
                t0 = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {
        k: {"median_s": med[k], "speedup_vs_f32": med["f32"] / med[k], "max_err": err[k]}
        for k in variants
    }


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"threads": torch.get_num_threads(), "results": {}}
    print("| backbone | input | variant | median s | x f32 | max err |\n|---|---|---|---|---|---|")
    for name in args.backbones:
        try:
            backbone = build_backbone(name, pretrained=True).eval()
        except ValueError:
            backbone = build_backbone(name, pretrained=False).eval()
        variants = _variants(backbone, args.compile)
        inputs = {
            "spp %dx%d" % tuple(args.image_hw): torch.randn(1, 3, *args.image_hw),
            f"rcnn {args.crops}x224": torch.randn(args.crops, 3, 224, 224),
        }
        for label, x in inputs.items():
            rows = _bench(variants, x, args.repeats)
            result["results"][f"{name} {label}"] = rows
            for k, r in rows.items():
                print(
                    f"| {name} | {label} | {k} | {r['median_s']:.3f} | "
                    f"{r['speedup_vs_f32']:.2f} | {r['max_err']:.1e} |"
                )
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
