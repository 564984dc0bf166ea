"""Compiled CPU window pooling: ``csrc/window_pool.c``, run over a few threads.

:func:`~spp_detect.modeling.window_pool.pool_windows` computes the same bins either way. On
the CPU the table method of ``window_pool_table.py`` spends most of its time on index
bookkeeping (dozens of small tensor ops over ~54k base bins for 1,500 windows), not on the
values; the compiled loop has no index tensors at all: per window it takes each row band's max
over contiguous runs of ``w * C`` values, then each bin's max over its columns, and reduces
the coarse levels from the fine ones (docs/pooling.md). It needs values that order like
signed integers, which ``window_pool._pool`` arranges (non-negative floats through their bit
patterns; int8-quantised maps as they are).

The extension is built by ``pip install`` when a C compiler is present (``setup.py``; it is
optional). Without it, or with ``SPP_DETECT_NATIVE_POOL=0`` in the environment, the table
method runs: the results are identical.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import torch
from torch import Tensor

from .window_pool_table import level_starts, pyramid_plan

logger = logging.getLogger(__name__)

# Version of csrc/window_pool.c's calling convention; a build in place from an older source
# (an editable install not rebuilt since) is not used.
_ABI = 2
try:
    from . import _window_pool as _ext
except ImportError:  # not built (no C compiler at install time): the table method runs
    _ext = None
if _ext is not None and getattr(_ext, "ABI", None) != _ABI:
    logger.warning(
        "%s is a stale build (ABI %s, want %s); window pooling uses tensor ops until it is "
        "rebuilt (pip install -e .)", _ext.__file__, getattr(_ext, "ABI", None), _ABI
    )  # fmt: skip
    _ext = None

__all__ = [
    "SAME_ORDER_INT", "SIGNED_INTS", "native_pool_available", "native_takes", "pool_native",
    "pool_maps_native",
]  # fmt: skip

# What the compiled loop pools: values compared as signed integers.
SIGNED_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)
# Signed integer dtype of each float dtype's width: non-negative IEEE floats order like their bit
# patterns read as these (``window_pool._pool``).
SAME_ORDER_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                  torch.float16: torch.int16, torch.bfloat16: torch.int16}  # fmt: skip
# Step kinds of csrc/window_pool.c's plan.
_BASE, _DERIVED, _COPY = 0, 1, 2
# Output bytes per thread: the loop writes ~7 GB/s from one thread, and a second one only pays
# on big outputs. 1,500 ZF-5 windows on 2 cores (reused output): int8 (19 MB) 2.65 ms on 1
# thread, 2.82 on 2; int32 (77 MB) 12.8 ms on 1, 10.7 on 2.
_BYTES_PER_THREAD = 32 << 20


def native_pool_available() -> bool:
    """Whether the compiled CPU pooling is built and not switched off
    (``SPP_DETECT_NATIVE_POOL=0``)."""
    return _ext is not None and os.environ.get("SPP_DETECT_NATIVE_POOL", "1") != "0"


def native_takes(feature_map: Tensor) -> bool:
    """Whether ``window_pool._pool`` hands this map to the compiled loop: it is built and on,
    the map is on the CPU and its values are integers, or floats without negative values
    (pooled through their bit patterns)."""
    if not (feature_map.is_cpu and native_pool_available()):
        return False
    dtype = feature_map.dtype
    return dtype in SIGNED_INTS or (dtype in SAME_ORDER_INT and bool(feature_map.min() >= 0))


def pool_native(
    feature_map: Tensor,
    cells: Tensor,
    levels: Tuple[int, ...],
    layout: str,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``window_pool._pool`` by the compiled loop.

    Args:
        feature_map (Tensor[C, H, W]): signed integer dtype, on the CPU.
        cells (Tensor[R, 4]): integer inclusive cell ranges ``x1, y1, x2, y2`` on the map,
            ``R >= 1`` (checked: the C loop reads the map at them).
        levels: pyramid levels (bins per side). layout: ``"channel"`` or ``"bin"``.
        out: contiguous CPU ``Tensor[R, C * sum(n * n)]`` of the map's dtype, or None.
    Returns:
        Tensor[R, C * sum(n * n)] in ``layout`` (``out`` when given).
    Raises:
        ValueError: any argument the C loop cannot take (it trusts what it is given), or the
            extension is not built.
    """
    levels = tuple(levels)
    cells, shape = _check_args(feature_map, cells, levels, layout, out)
    channels, _, width = feature_map.shape
    num_windows, num_bins = cells.shape[0], shape[1] // channels
    if out is None:
        out = feature_map.new_empty(shape)
    hwc = feature_map.permute(1, 2, 0).contiguous()  # each cell's C values contiguous
    if _overlap(out, hwc):
        raise ValueError("pool_native: out must not share memory with the feature map")
    steps = _steps(levels)

    def run(first: int, last: int) -> None:
        _ext.pool(
            hwc.data_ptr(), width, channels, hwc.element_size(), cells.data_ptr(), first, last,
            steps.data_ptr(), steps.shape[0], num_bins, out.data_ptr(), int(layout == "channel"),
        )  # fmt: skip

    out_bytes = out.numel() * out.element_size()
    threads = max(1, min(torch.get_num_threads(), num_windows, out_bytes // _BYTES_PER_THREAD))
    bounds = [num_windows * t // threads for t in range(threads + 1)]
    if threads == 1:
        run(0, num_windows)
    else:
        # The extension releases the GIL: the threads pool disjoint rows of ``out`` at once.
        list(_executor(threads).map(run, bounds[:-1], bounds[1:]))
    return out


def pool_maps_native(maps: Tensor, levels: Tuple[int, ...]) -> Tensor:
    """The SPP layer (``spp.SpatialPyramidPooling``) on a batch, by the compiled loop: each map
    is one window of the maps stacked along their height, so no bin crosses into another map.

    Args:
        maps (Tensor[N, C, H, W]): on the CPU, values ``native_takes`` accepts; ``N >= 1``.
        levels: pyramid levels.
    Returns:
        Tensor[N, C * sum(n * n)] in the maps' dtype, each level flattened as ``(C, n, n)``.
    """
    num, channels, height, width = maps.shape
    # [N * H, W, C]: each cell's channels contiguous, the maps one below the other (one copy).
    stacked = maps.permute(0, 2, 3, 1).contiguous().view(num * height, width, channels)
    bits = SAME_ORDER_INT.get(maps.dtype)
    if bits is not None:  # non-negative floats: their bit patterns (see native_takes)
        stacked = stacked.view(bits)
    top = torch.arange(num, dtype=torch.int64) * height
    cells = torch.stack(
        [torch.zeros_like(top), top, torch.full_like(top, width - 1), top + height - 1], dim=1
    )
    pooled = pool_native(stacked.permute(2, 0, 1), cells, levels, "channel")  # read in place
    return pooled.view(maps.dtype)


def _check_args(
    feature_map: Tensor, cells: Tensor, levels: Tuple[int, ...], layout: str, out: Optional[Tensor]
) -> Tuple[Tensor, Tuple[int, int]]:
    """``pool_native``'s checks: ``(cells as contiguous CPU int64, the result's shape)``."""
    if _ext is None:
        raise ValueError("pool_native: the compiled window pooling is not built (setup.py)")
    if feature_map.dtype not in SIGNED_INTS or not feature_map.is_cpu:
        raise ValueError(
            f"pool_native takes a CPU map of a signed integer dtype, got {feature_map.dtype} on "
            f"{feature_map.device}"
        )
    if feature_map.ndim != 3 or min(feature_map.shape) < 1:
        raise ValueError(f"pool_native: feature_map must be [C, H, W], got {feature_map.shape}")
    if not levels or not all(isinstance(n, int) and n >= 1 for n in levels):
        raise ValueError(f"pool_native: levels must be positive ints, got {levels}")
    if layout not in ("channel", "bin"):
        raise ValueError(f"pool_native: layout must be 'channel' or 'bin', got {layout!r}")
    if cells.ndim != 2 or cells.shape[1] != 4 or cells.dtype not in SIGNED_INTS:
        raise ValueError(
            f"pool_native: cells must be integer [R, 4], got {cells.dtype} {cells.shape}"
        )
    channels, height, width = feature_map.shape
    cells = cells.to("cpu", torch.int64).contiguous()
    x1, y1, x2, y2 = cells.unbind(1)
    valid = (x1 >= 0) & (y1 >= 0) & (x1 <= x2) & (y1 <= y2) & (x2 < width) & (y2 < height)
    if cells.shape[0] == 0 or not bool(valid.all()):
        raise ValueError(
            f"pool_native: cells must be R >= 1 valid ranges on a {height} x {width} map"
        )
    shape = (cells.shape[0], channels * sum(n * n for n in levels))
    if out is not None and (
        tuple(out.shape) != shape
        or out.dtype != feature_map.dtype
        or not out.is_cpu
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"pool_native: out must be contiguous CPU {feature_map.dtype} {list(shape)}"
        )
    return cells, shape


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two contiguous tensors' bytes overlap."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


@functools.lru_cache(maxsize=None)
def _steps(levels: Tuple[int, ...]) -> Tensor:
    """The plan csrc/window_pool.c follows per window (LongTensor[S, 5], made once per pyramid;
    read only): ``(kind, n, first bin, source's first bin, q)`` for each base level (pooled
    from the map), then each derived level finer first (the max of ``q x q`` groups of its
    source's bins: ``window_pool_table.pyramid_plan``), then each repeated level (a copy of its
    first occurrence). Every bin is written by one step."""
    base, sources = pyramid_plan(levels)
    starts = level_starts(levels)
    steps = [(_BASE, n, starts[n], 0, 0) for n in base]
    for m in sorted(sources, reverse=True):
        n = sources[m]
        steps.append((_DERIVED, m, starts[m], starts[n], n // m))
    pos = 0
    for n in levels:
        if pos != starts[n]:
            steps.append((_COPY, n, pos, starts[n], 0))
        pos += n * n
    return torch.tensor(steps, dtype=torch.int64)


_executor_lock = threading.Lock()
_executors: dict = {}


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: a fresh lock (the parent's might have
    been held by another thread at the fork) and no executors."""
    global _executor_lock
    _executor_lock = threading.Lock()
    _executors.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool of ``threads`` worker threads per process, made on first use (a forked child
    starts with none: ``_after_fork_in_child``)."""
    with _executor_lock:
        if threads not in _executors:
            _executors[threads] = ThreadPoolExecutor(threads, thread_name_prefix="spp-pool")
        return _executors[threads]
