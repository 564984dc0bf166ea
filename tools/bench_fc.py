"""Benchmark fc6 + fc7 (ZF-5: 12800 x 4096, 4096 x 4096) on N windows in several arithmetics.

Variants, all timed in turns within every repeat (a load change on a shared machine hits them
alike; read the ratios to float32, not the absolute times):

- ``f32``: ``FCHead.fc7_features`` as trained.
- ``svd``: truncated SVD at Fast R-CNN's ranks (1024 / 256 for 4096-wide layers).
- ``bf16``, ``svd-bf16``: ``FastFCHead(mode="bf16")`` (oneDNN bfloat16 matmuls).
- ``int8``, ``svd-int8``: ``FastFCHead(mode="int8")`` (per-row int8, ``torch._int_mm``).
- ``ao-int8`` (``--ao``): ``torch.ao.quantization.quantize_dynamic`` (deprecated in torch 2.x).
- ``torchao-int8`` (``--torchao``, if installed): torchao's
  ``Int8DynamicActivationInt8WeightConfig``.
- ``*-compile`` (``--compile``): ``torch.compile`` of the float32 and bf16 heads.

The SVD layers are made of random factors of the right shapes (timing does not depend on the
values, and a full SVD of a random 4096 x 12800 matrix takes minutes here); the error column is
therefore only meaningful for the non-SVD variants: ``max |fc7 - fc7_f32| / max |fc7_f32|``.

    python tools/bench_fc.py --windows 2000 --repeats 5 --ao --torchao --output fc.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spp_detect.benchmark.machine import machine_info  # noqa: E402
from spp_detect.modeling.fast_head import FastFCHead  # noqa: E402
from spp_detect.modeling.head import FCHead  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=2000, help="distinct windows per image")
    p.add_argument("--in-features", type=int, default=256 * 50, help="ZF-5: 256 x 50 bins")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ranks", type=int, nargs=2, default=[1024, 256], help="SVD ranks fc6 fc7")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--ao", action="store_true", help="also torch.ao quantize_dynamic")
    p.add_argument("--torchao", action="store_true", help="also torchao's int8 (if installed)")
    p.add_argument("--compile", action="store_true", help="also torch.compile (slow to build)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="write the figures as JSON")
    return p


def _svd_shaped(head: FCHead, ranks) -> FCHead:
    """A copy of ``head`` whose fc6/fc7 have the truncated-SVD shapes (random factors)."""
    out = copy.deepcopy(head)
    for name, rank in zip(("fc6", "fc7"), ranks):
        layer = getattr(out, name)
        first = nn.Linear(layer.in_features, rank, bias=False)
        second = nn.Linear(rank, layer.out_features)
        setattr(out, name, nn.Sequential(first, second))
    out.svd_ranks = tuple(ranks)
    return out.eval()


def build_variants(args: argparse.Namespace, head: FCHead) -> Dict[str, Callable]:
    """``{name: fn(pooled) -> fc7}``."""
    svd = _svd_shaped(head, args.ranks)
    v: Dict[str, Callable] = {
        "f32": head.predict,
        "svd": svd.predict,
        "bf16": FastFCHead(head, "bf16").predict,
        "svd-bf16": FastFCHead(svd, "bf16").predict,
        "int8": FastFCHead(head, "int8").predict,
        "svd-int8": FastFCHead(svd, "int8").predict,
    }
    seq = nn.Sequential(head.fc6, nn.ReLU(), head.fc7, nn.ReLU()).eval()
    if args.ao:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(seq), {nn.Linear}, dtype=torch.qint8
            )
        v["ao-int8"] = q
    if args.torchao:
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError:
            print("torchao not installed: skipped", file=sys.stderr)
        else:
            t = copy.deepcopy(seq)
            quantize_(t, Int8DynamicActivationInt8WeightConfig())
            v["torchao-int8"] = t
    if args.compile:
        v["f32-compile"] = torch.compile(head.predict)
        v["svd-bf16-compile"] = torch.compile(FastFCHead(svd, "bf16").predict)
    return v


def _fc7(out):
    return out[0] if isinstance(out, tuple) else out


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    head = FCHead(args.in_features, 20, hidden=args.hidden).eval()
    # Pooled conv5 features are non-negative (max of ReLU outputs).
    pooled = torch.relu(torch.randn(args.windows, args.in_features))
    variants = build_variants(args, head)
    times: Dict[str, list] = {k: [] for k in variants}
    with torch.no_grad():
        ref = head.predict(pooled)[0]
        scale = float(ref.abs().max())
        err = {
            k: float((_fc7(f(pooled)).float() - ref).abs().max()) / scale
            for k, f in variants.items()
        }
        for _ in range(args.warmup):
            for f in variants.values():
                f(pooled)
        for _ in range(args.repeats):
            for k, f in variants.items():
                t0 = time.perf_counter()
                f(pooled)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    rows = {
        k: {
            "median_s": med[k],
            "min_s": min(times[k]),
            "speedup_vs_f32": med["f32"] / med[k],
            "rel_max_err": None if k.startswith("svd") else err[k],
        }
        for k in variants
    }
    result = {
        "windows": args.windows,
        "shapes": [[args.in_features, args.hidden], [args.hidden, args.hidden]],
        "svd_ranks": list(args.ranks),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": machine_info(torch.device("cpu")),
        "variants": rows,
    }
    print("| variant | median s | min s | x f32 | rel. max err fc7 |\n|---|---|---|---|---|")
    for k, r in rows.items():
        e = "-" if r["rel_max_err"] is None else f"{r['rel_max_err']:.1e}"
        print(f"| {k} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['speedup_vs_f32']:.1f} | {e} |")
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
