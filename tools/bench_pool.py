"""Benchmark window pyramid pooling: ``pool_windows`` vs ``torchvision.ops.roi_pool`` per level.

Setting (SPP-net sec. 4.1): the conv5 map of a 688-pixel image (ZF-5, stride 16: 43 x 57 cells
for a 688 x 917 image, 256 channels) and 2,000 windows; the 6x6, 3x3, 2x2, 1x1 pyramid.
``roi_pool`` is called once per level, on boxes given in cell coordinates (``spatial_scale=1``):
it rounds ``x1, x2`` and treats ``x2`` as inclusive (``roi_width = x2 - x1 + 1``), so both pool
exactly the same cells. Its bins use float32 ``floor(i * (w / n))`` and ``ceil((i + 1) * (w / n))``,
which round differently from the exact rule now and then; the agreement check reports that.

    python tools/bench_pool.py --device cpu --output bench_pool.json
    python tools/bench_pool.py --variants --threads 1 2 --repeats 7   # docs/pooling.md

``--variants`` times ``pool_windows`` per output layout and dtype (what SPP-net's test-time
copies use: ``layout="bin"`` into the head's dtype) beside its fixed part (sparse table and
corner rows) and the memory-bandwidth bound (writing an output-sized buffer once), all taking
turns in every repeat, at each thread count given; each variant's output is checked against
the channel-layout float32 one (permuted and rounded). Where the compiled CPU pooling is built
(``window_pool_native.py``), each variant is also timed by the tensor method (``[tensor]``).

On a machine shared with other busy processes, libgomp's spinning threads make every parallel
op wait for a descheduled thread: many-op code such as pool_windows slows down by 10x or more
with 2+ threads. Measure there with ``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torchvision.ops import roi_pool

from spp_detect.modeling.window_pool import pool_windows, project_windows
from spp_detect.modeling.window_pool_native import SAME_ORDER_INT, native_pool_available


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--image-hw", type=int, nargs=2, default=[688, 917], help="image (H, W) px")
    p.add_argument("--stride", type=int, default=16, help="conv5 stride of ZF-5")
    p.add_argument("--channels", type=int, default=256, help="conv5 channels of ZF-5")
    p.add_argument("--windows", type=int, default=2000, help="windows per image (sec. 4.1)")
    p.add_argument("--levels", type=int, nargs="+", default=[6, 3, 2, 1])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--threads", type=int, nargs="+", default=None,
        help="torch CPU threads (default: torch's); --variants times each count given",
    )  # fmt: skip
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variants", action="store_true",
        help="instead: time pool_windows per layout / dtype beside its table and the write bound",
    )  # fmt: skip
    p.add_argument(
        "--baseline", type=Path, default=None,
        help="--variants: also time this older window_pool.py (git show REV:spp_detect/...)",
    )  # fmt: skip
    p.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    return p


def random_windows(num: int, image_hw, gen: torch.Generator) -> torch.Tensor:
    """Proposal-like windows inside the image: log-uniform sides from 16 px to the image side."""
    height, width = image_hw
    sides = torch.tensor([width, height], dtype=torch.float64)
    frac = torch.exp(torch.rand(num, 2, generator=gen, dtype=torch.float64) * torch.log(sides / 16))
    size = 16 * frac
    start = torch.rand(num, 2, generator=gen, dtype=torch.float64) * (sides - size)
    return torch.cat([start, start + size], dim=1).float()


def _time(fns: dict, device: str, warmup: int, repeats: int) -> dict:
    """Median and min milliseconds per function; the functions take turns in every repeat so
    that load changes on a shared machine hit all of them alike. ``cpu_median_ms``: this
    process's CPU time (all threads, page faults included); with one thread on a busy machine
    it leaves out the time other processes held the core, so it varies much less."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(1000.0 * (time.perf_counter() - start))
            cpu[name].append(1000.0 * (time.process_time() - start_cpu))
    return {
        name: {
            "median_ms": statistics.median(t),
            "min_ms": min(t),
            "all_ms": t,
            "cpu_median_ms": statistics.median(cpu[name]),
        }
        for name, t in times.items()
    }


def _roi_pool_bins_exact(cells: torch.Tensor, levels) -> torch.Tensor:
    """Windows where roi_pool's float32 bin edges equal the exact floor/ceil rule (Bool[R])."""
    same = torch.ones(cells.shape[0], dtype=torch.bool)
    for side in (cells[:, 2] - cells[:, 0] + 1, cells[:, 3] - cells[:, 1] + 1):
        for n in levels:
            i = torch.arange(n + 1)
            size32 = side.float()[:, None] / float(n)  # roi_pool: float bin_size = w / n
            start32 = torch.floor(i[:-1].float() * size32).long()
            end32 = torch.ceil(i[1:].float() * size32).long()
            start = (i[:-1] * side[:, None]) // n
            end = -((-i[1:] * side[:, None]) // n)
            same &= ((start32 == start) & (end32 == end)).all(dim=1)
    return same


def _print_summary(result: dict, args: argparse.Namespace) -> None:
    """The timings and the agreement of ``main``'s result, as a small table."""
    levels, (h, w) = result["levels"], result["map_hw"]
    print(
        f"{args.windows} windows, conv5 {args.channels} x {h} x {w}, levels "
        f"{levels}, {args.device} ({result['threads']} threads), {args.dtype}"
    )
    print(f"{'method':<28}{'median ms':>12}{'min ms':>12}")
    rows = [
        ("pool_windows", result["pool_windows"]),
        (f"roi_pool x{len(levels)} levels", result["roi_pool_per_level"]),
    ]
    if args.backward:
        rows += [
            ("pool_windows fwd+bwd", result["pool_windows_fwd_bwd"]),
            ("roi_pool fwd+bwd", result["roi_pool_fwd_bwd"]),
        ]
    for name, t in rows:
        print(f"{name:<28}{t['median_ms']:>12.1f}{t['min_ms']:>12.1f}")
    agree = result["agreement"]
    print(f"ratio roi_pool / pool_windows: {result['ratio_roi_pool_over_pool_windows']:.2f}x")
    print(
        f"agreement: {agree['windows_with_same_bins']}/{args.windows} windows have the same bins "
        f"in both; {agree['of_those_outputs_equal']} of them give equal outputs; "
        f"{agree['windows_outputs_equal']} equal overall (max |diff| {agree['max_abs_diff']:.3g})"
    )


# (row name, layout, map dtype, output dtype): the trained layout, and SPP-net's test-time
# copies (bin layout, pooled into the head's dtype: float32 or bfloat16 for fast_head=bf16).
VARIANTS = [
    ("channel float32", "channel", torch.float32, torch.float32),
    ("bin float32", "bin", torch.float32, torch.float32),
    ("bin float32 map -> bfloat16", "bin", torch.float32, torch.bfloat16),
    ("bin bfloat16 map", "bin", torch.bfloat16, torch.bfloat16),
]


def _variant_fns(fmap: torch.Tensor, cells: torch.Tensor, levels, baseline) -> tuple:
    """The functions ``pool_variants`` times, and whether each variant's output is exact."""
    from spp_detect.modeling import window_pool as wp
    from spp_detect.modeling import window_pool_table as wpt

    dim = fmap.shape[0] * sum(n * n for n in levels)

    def table(fm):
        fm = fm.view(SAME_ORDER_INT[fm.dtype]) if bool(fm.min() >= 0) else fm  # as _pool
        base_levels, _ = wpt.pyramid_plan(levels)
        anchors, ka, kb = wpt.bin_corners(cells, base_levels)
        return wpt.corner_rows(anchors, ka, kb, *wpt.build_table(fm, ka, kb)[1:])

    maps = {dt: fmap.to(dt) for dt in (torch.float32, torch.bfloat16)}
    fns = {}
    if baseline is not None:  # another version of window_pool.py, e.g. from git history
        spec = importlib.util.spec_from_file_location(
            "spp_detect.modeling.window_pool_baseline", baseline
        )
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        fns["baseline channel float32"] = lambda: old.pool_windows(
            maps[torch.float32], cells, levels
        )
    from spp_detect.modeling.fast_head import quantize_map

    pooling = {
        name: lambda fm=maps[m], lay=lay, dt=dt: pool_windows(
            fm, cells, levels, layout=lay, dtype=dt
        )
        for name, lay, m, dt in VARIANTS
    }
    # test.fast_head=int8map: the float32 map quantised once, pooled in int8.
    int8_name = "bin, float32 map -> int8 map (int8map)"
    pooling[int8_name] = lambda: pool_windows(
        quantize_map(maps[torch.float32])[0], cells, levels, layout="bin"
    )
    # Each by the compiled loop (window_pool_native.py) where it is built, and by the tensor
    # method it falls back to.
    methods = {"": "1"} if not native_pool_available() else {"": "1", " [tensor]": "0"}
    for name, fn in pooling.items():
        for suffix, native in methods.items():
            fns[name + suffix] = lambda fn=fn, native=native: _with_native(native, fn)
    for dt, fm in maps.items():
        fns[f"table + corner rows, {str(dt)[6:]} map"] = lambda fm=fm: table(fm)
        fns[f"write output once, {str(dt)[6:]} (bound)"] = lambda dt=dt: torch.empty(
            cells.shape[0], dim, dtype=dt
        ).fill_(1)
    ref = pool_windows(maps[torch.float32], cells, levels)
    order = wp.bin_major_order(fmap.shape[0], levels)
    want = {name: (ref[:, order] if lay == "bin" else ref).to(dt) for name, lay, _, dt in VARIANTS}
    want["baseline channel float32"] = ref
    scale = quantize_map(maps[torch.float32])[1]
    want[int8_name] = torch.round(ref[:, order] / scale).clamp(-127, 127).to(torch.int8)
    exact = {
        name: bool(torch.equal(fns[name](), want[name.replace(" [tensor]", "")]))
        for name in fns
        if name.replace(" [tensor]", "") in want
    }
    return fns, exact


def _with_native(native: str, fn):
    """``fn()`` with the compiled pooling on ("1") or off ("0"): SPP_DETECT_NATIVE_POOL."""
    before = os.environ.get("SPP_DETECT_NATIVE_POOL")
    os.environ["SPP_DETECT_NATIVE_POOL"] = native
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["SPP_DETECT_NATIVE_POOL"]
        else:
            os.environ["SPP_DETECT_NATIVE_POOL"] = before


def pool_variants(fmap: torch.Tensor, cells: torch.Tensor, args: argparse.Namespace) -> dict:
    """Milliseconds (wall and CPU) of each of ``VARIANTS`` (and of ``args.baseline``), of
    the fixed part (sparse table and corner rows, per map dtype) and of writing an
    output-sized buffer once (per dtype: the bound), at each thread count of ``args.threads``;
    plus whether each variant's output is exact."""
    levels = tuple(args.levels)
    fns, exact = _variant_fns(fmap, cells, levels, args.baseline)
    result = {"exact": exact, "ms": {}, "cpu_ms": {}}
    default_threads = torch.get_num_threads()
    for threads in args.threads or [default_threads]:
        torch.set_num_threads(threads)
        timed = _time(fns, "cpu", args.warmup, args.repeats)
        result["ms"][str(threads)] = {k: v["median_ms"] for k, v in timed.items()}
        result["cpu_ms"][str(threads)] = {k: v["cpu_median_ms"] for k, v in timed.items()}
    torch.set_num_threads(default_threads)
    print(
        f"{cells.shape[0]} windows, conv5 {tuple(fmap.shape)}, levels {list(levels)}; "
        "median ms, wall / CPU"
    )
    head = "".join(f"{t + ' thr':>16}" for t in result["ms"])
    print(f"{'variant':<40}{head}  exact")
    for name in fns:
        times = "".join(
            f"{result['ms'][t][name]:>9.1f} /{result['cpu_ms'][t][name]:>5.1f}"
            for t in result["ms"]
        )
        print(f"{name:<40}{times}  {exact.get(name, '')}")
    return result


def main(args: argparse.Namespace) -> dict:
    if args.variants:
        gen = torch.Generator().manual_seed(args.seed)
        map_hw = (args.image_hw[0] // args.stride, args.image_hw[1] // args.stride)
        fmap = torch.relu(torch.randn(args.channels, *map_hw, generator=gen))
        windows = random_windows(args.windows, args.image_hw, gen)
        cells = project_windows(windows, args.stride, 0.0, map_hw)
        with torch.no_grad():
            result = {"variants": pool_variants(fmap, cells, args)}
        if args.output is not None:
            args.output.write_text(json.dumps(result, indent=2))
        return result
    if args.threads:
        torch.set_num_threads(args.threads[0])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    gen = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    map_hw = (args.image_hw[0] // args.stride, args.image_hw[1] // args.stride)
    fmap = torch.relu(torch.randn(args.channels, *map_hw, generator=gen)).to(args.device, dtype)
    windows = random_windows(args.windows, args.image_hw, gen)
    cells = project_windows(windows, args.stride, 0.0, map_hw).to(args.device)
    # roi_pool boxes [batch, x1, y1, x2, y2] in cell units: x2, y2 inclusive, as our cells.
    boxes = torch.cat([torch.zeros_like(cells[:, :1]), cells], dim=1).to(dtype)
    levels = list(args.levels)

    def ours(fm=fmap):
        return pool_windows(fm, cells, levels)

    def theirs(fm=fmap):
        pooled = [roi_pool(fm[None], boxes, n, spatial_scale=1.0) for n in levels]
        return torch.cat([p.flatten(1) for p in pooled], dim=1)

    with torch.no_grad():
        timed = _time({"ours": ours, "theirs": theirs}, args.device, args.warmup, args.repeats)
        t_ours, t_theirs = timed["ours"], timed["theirs"]
        a, b = ours().float().cpu(), theirs().float().cpu()
    exact = _roi_pool_bins_exact(cells.cpu(), levels)
    equal_rows = (a == b).all(dim=1)
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "map_hw": list(map_hw),
        "channels": args.channels,
        "windows": args.windows,
        "levels": levels,
        "pool_windows": t_ours,
        "roi_pool_per_level": t_theirs,
        "ratio_roi_pool_over_pool_windows": t_theirs["median_ms"] / t_ours["median_ms"],
        "agreement": {
            "windows_with_same_bins": int(exact.sum()),
            "of_those_outputs_equal": int((equal_rows & exact).sum()),
            "windows_outputs_equal": int(equal_rows.sum()),
            "max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0,
        },
    }

    if args.backward:

        def fwd_bwd(fn):
            fm = fmap.detach().clone().requires_grad_()
            fn(fm).sum().backward()

        timed = _time(
            {"ours": lambda: fwd_bwd(ours), "theirs": lambda: fwd_bwd(theirs)},
            args.device,
            args.warmup,
            args.repeats,
        )
        result["pool_windows_fwd_bwd"] = timed["ours"]
        result["roi_pool_fwd_bwd"] = timed["theirs"]

    _print_summary(result, args)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
