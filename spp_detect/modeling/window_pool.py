"""Windows on the conv feature map: projection (SPP-net appendix A) and pyramid pooling.

SPP-net computes the conv5 map of an image once and pools each of the ~2,000 proposal windows
from it (sec. 4.1). Two steps:

- :func:`project_windows` maps a window in image pixels to an inclusive range of map cells,
  with the rule of appendix A (each edge to the nearest cell centre, rounded inward).
- :func:`pool_windows` applies the SPP layer to every window's cell range: the same bins as
  :class:`~spp_detect.modeling.spp.SpatialPyramidPooling` (bin ``i`` of ``n`` over a window of
  ``w`` cells starting at ``x1`` covers ``x1 + floor(i*w/n) .. x1 + ceil((i+1)*w/n) - 1``) and
  the same output layout, so a window covering the whole map gives exactly the SPP layer's output;
  or, for SPP-net's test-time copies, each bin's channels contiguous (``layout="bin"``).

How :func:`pool_windows` avoids a loop over windows (all bins of all windows in a few big ops):

1. Range-max sparse table (``window_pool_table.py``). ``T[a][b][y, x] = max(F[y : y + 2^a,
   x : x + 2^b])`` is built by doubling. Any bin of height ``h`` and width ``w`` is then the max
   of four (overlapping) blocks of size ``2^a x 2^b``, ``a = floor(log2 h)``, ``b = floor(log2
   w)``, anchored at the bin's four corners: four row gathers from the table, stored
   channels-last so that each gather reads ``C`` contiguous values.
2. Coarse levels from fine ones. When level ``m`` divides a finer level ``n = m * q``, bins
   ``j*q .. j*q + q - 1`` of level ``n`` cover exactly bin ``j`` of level ``m`` (their first
   start is ``floor(j*w/m)``, their last end ``ceil((j+1)*w/m)``, and neighbouring bins touch or
   overlap), so the 3x3, 2x2 and 1x1 levels are max-reductions of the 6x6 grid: only 36 of
   the 50 bins of the detection pyramid are gathered.
3. Fewer gathers. A bin whose height (width) is a power of two is covered by one block row
   (column), so it needs 2 or 1 of its 4 corners: 1.66 gathers per bin instead of 4 for
   proposal-like windows (``window_pool_table.CornerPlan``).
4. On the CPU the windows go in chunks whose gather buffer stays in the cache (one buffer for
   all costs several times more than the gathers), straight into their rows of the result; the
   SPP layer's ``(C, n, n)`` layout costs one more transposing copy per level (docs/pooling.md).
5. Maps without negative values (conv5 after its ReLU) are pooled through their bit patterns
   as integers, which order alike and need no conversion to compare.
6. Gradient: the backward sends each bin's gradient to its maximal cell, found by pooling the
   ranks of the cells' values with the same code (see ``_PoolWindows``).
7. On the CPU, integer values (points 5-6) go to the compiled loop of ``window_pool_native.py``
   when it is built: the same bins without index tensors, 5x faster. The rest is its fallback.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .spp import DEFAULT_LEVELS, check_levels
from .window_pool_table import (
    bin_corners,
    build_table,
    corner_rows,
    derived_levels,
    gather_base_bins,
    level_starts,
    plan_corners,
    pyramid_plan,
    write_channel_major,
)
from .window_pool_native import (
    SAME_ORDER_INT,
    SIGNED_INTS,
    native_pool_available,
    native_takes,
    pool_native,
)

__all__ = ["POOLED_LAYOUTS", "project_windows", "pool_windows", "bin_major_order"]

# Bytes of the per-chunk gather buffer on the CPU, small enough to stay in cache. 2000 windows,
# 256 x 43 x 57 map, bin layout, float32, 1 thread: 1 MiB 86 ms, 2 MiB 68, 4 MiB 61, 16 MiB 70.
_CHUNK_BYTES = 4 << 20
# Up to this many windows are pooled one by one (``_pool_each``) when the compiled loop is not
# built: 6 windows of a 112 x 43 x 57 map took 25 ms that way and 387 ms through the table.
_FEW_WINDOWS = 16


# --------------------------------------------------------------------------------------------
# Appendix A: windows -> cells
# --------------------------------------------------------------------------------------------


def project_windows(
    windows: Tensor,
    stride: int,
    center_offset: float,
    feature_hw: Tuple[int, int],
    inward: float = 0.0,
) -> Tensor:
    """Project image windows onto a conv feature map (SPP-net appendix A, the released code's rule).

    Cell ``j`` of the map has its receptive-field centre at pixel ``center_offset + stride * j``.
    Each window edge first moves ``inward`` pixels towards the window's inside (the SPP_net
    code's ``offset``, 6.5 px for ZF-5; 0 in the paper's text), then goes to the nearest cell
    centre, rounding inward::

        left  = floor((x1 + d - c) / S + 0.5)
        right = ceil((x2 - 1 - d - c) / S - 0.5)    # x2 - 1: the last pixel of [x1, x2)

    (``spm_pool_caffe_mex.cpp``: ``floor((x0 - offset0 + offset) / S + 0.5)`` and
    ``ceil((x1 - offset0 - offset) / S - 0.5)`` in MATLAB's 1-based pixels and cells.)

    and the same for ``y``. A window smaller than a cell (``left > right``) collapses to the cell
    ``(left + right) // 2`` between its rounded edges; then the range is clamped to the map, so a
    window partly outside the image keeps its inside part and one fully outside becomes the
    nearest border cell. Inverted windows (``x2 < x1``) take the same collapse path: they become
    one cell between their edges. Every output range is therefore non-empty and valid input for
    :func:`pool_windows`.

    Args:
        windows (Tensor[R, 4]): xyxy in continuous pixels of the image the map was computed from
            (the resized image; window ``[x1, x2)`` covers pixels ``x1 .. x2 - 1``). Any real
            dtype; the arithmetic is done in float64.
        stride (int): ``S``, pixels per cell (16 for ZF-5 conv5).
        center_offset (float): ``c``, pixel of cell 0's receptive-field centre (0 with padding
            ``floor(k/2)`` in every layer; see the backbone's ``center_offset``).
        feature_hw: ``(H, W)`` of the feature map, both ``>= 1``.
        inward (float): ``d``, pixels each edge moves inward before rounding (>= 0).
    Returns:
        LongTensor[R, 4]: inclusive cell indices ``x1, y1, x2, y2`` on the feature map, with
        ``0 <= x1 <= x2 < W`` and ``0 <= y1 <= y2 < H``; on the windows' device.
    """
    if windows.ndim != 2 or windows.shape[1] != 4:
        raise ValueError(f"windows must be Tensor[R, 4] xyxy, got shape {tuple(windows.shape)}")
    if windows.dtype == torch.bool or windows.is_complex():
        raise ValueError(f"windows must be real-valued, got dtype {windows.dtype}")
    try:
        stride = operator.index(stride)
    except TypeError:
        raise ValueError(f"stride must be a positive int, got {stride!r}") from None
    if stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride}")
    height, width = _check_hw(feature_hw)
    if windows.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=windows.device)
    w = windows.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("windows contain NaN or infinite coordinates")

    c = float(center_offset)
    d = float(inward)
    if not d >= 0.0:
        raise ValueError(f"inward offset must be >= 0 pixels, got {inward}")
    # Appendix A: each edge to the nearest cell centre; floor(u + 0.5) sends a left edge halfway
    # between two centres to the right one, ceil(u - 0.5) a right edge to the left one (inward).
    lo = torch.floor((w[:, :2] + d - c) / stride + 0.5)
    hi = torch.ceil((w[:, 2:] - 1.0 - d - c) / stride - 0.5)
    # A window narrower than a cell rounds to an empty range: keep the middle cell.
    empty = lo > hi
    mid = torch.floor((lo + hi) / 2.0)  # exact: lo + hi is a small integer in float64
    lo = torch.where(empty, mid, lo)
    hi = torch.where(empty, mid, hi)
    upper = torch.tensor([width - 1, height - 1], dtype=torch.float64, device=w.device)
    lo = torch.minimum(lo.clamp(min=0.0), upper)
    hi = torch.minimum(hi.clamp(min=0.0), upper)
    return torch.cat([lo, hi], dim=1).to(torch.long)


def _check_hw(feature_hw: Sequence[int]) -> Tuple[int, int]:
    try:
        height, width = (operator.index(v) for v in feature_hw)
    except (TypeError, ValueError):
        raise ValueError(f"feature_hw must be (H, W) ints, got {feature_hw!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"feature_hw must be >= 1 on both sides, got {(height, width)}")
    return height, width


# --------------------------------------------------------------------------------------------
# Pyramid pooling of cell ranges
# --------------------------------------------------------------------------------------------

# Layouts of a pooled window vector. "channel": the SPP layer's, per level ``C x n x n``
# (channel-major), what a trained fc6 reads. "bin": per level ``n x n x C``, each bin's C
# channels contiguous, as the table gathers produce them: no transpose; a test-time head whose
# fc6 input columns are permuted by :func:`bin_major_order` reads it (``SPPDetector``).
POOLED_LAYOUTS = ("channel", "bin")


def pool_windows(
    feature_map: Tensor,
    cells: Tensor,
    levels: Sequence[int] = DEFAULT_LEVELS,
    *,
    layout: str = "channel",
    dtype: Optional[torch.dtype] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Spatial pyramid max pooling of many windows of one feature map (SPP-net sec. 2.3, 4.1).

    Equivalent to cropping ``feature_map[:, y1 : y2 + 1, x1 : x2 + 1]`` for each window and
    applying ``SpatialPyramidPooling(levels)``, without a loop over windows (see the module
    docstring for the method).

    Args:
        feature_map (Tensor[C, H, W]): one image's conv map (e.g. conv5), any real dtype
            (float16 computes in float16: max pooling is exact), CPU or CUDA.
        cells (LongTensor[R, 4]): inclusive cell ranges ``x1, y1, x2, y2`` on the feature map
            (from :func:`project_windows`), ``0 <= x1 <= x2 < W``, ``0 <= y1 <= y2 < H``.
        levels: pyramid levels, bins per side; ``(6, 3, 2, 1)`` in the paper's detector.
        layout: ``"channel"`` (the SPP layer's) or ``"bin"`` (see ``POOLED_LAYOUTS``).
        dtype: dtype of the result (default: the map's). The map is cast first; rounding is
            monotonic, so max pooling commutes with it: pooling into bfloat16 gives exactly the
            float32 result rounded, with half the bytes to build and write.
        out: a contiguous tensor of the result's shape, dtype and device to write into (e.g.
            one scale's block of rows of a multi-scale result); not with autograd.
    Returns:
        Tensor[R, C * sum(n * n)] on the map's device: per window the levels in the given
        order, each flattened as ``(C, n, n)`` (``layout="channel"``) or ``(n, n, C)``
        (``"bin"``, equal to the channel layout's ``[:, bin_major_order(C, levels)]``).
        ``R = 0`` gives ``[0, C * sum(n * n)]``. Differentiable with respect to
        ``feature_map`` (once): like max pooling, each bin's gradient goes to one maximal cell
        of the bin (when cells tie, to one of them).
    """
    levels = check_levels(levels)
    if layout not in POOLED_LAYOUTS:
        raise ValueError(f"layout must be one of {POOLED_LAYOUTS}, got {layout!r}")
    if feature_map.ndim != 3 or min(feature_map.shape) < 1:
        raise ValueError(
            f"feature_map must be Tensor[C, H, W] with C, H, W >= 1, "
            f"got shape {tuple(feature_map.shape)}"
        )
    if cells.ndim != 2 or cells.shape[1] != 4:
        raise ValueError(f"cells must be LongTensor[R, 4] x1,y1,x2,y2, got {tuple(cells.shape)}")
    if cells.dtype.is_floating_point or cells.is_complex() or cells.dtype == torch.bool:
        raise ValueError(f"cells must be an integer tensor of cell indices, got {cells.dtype}")
    if dtype is not None:
        feature_map = feature_map.to(dtype)
    channels, height, width = feature_map.shape
    shape = (cells.shape[0], channels * sum(n * n for n in levels))
    grad = torch.is_grad_enabled() and feature_map.requires_grad
    if out is not None:
        _check_out(out, shape, feature_map, grad)
    if cells.shape[0] == 0:
        if out is not None:
            return out
        empty = feature_map.new_zeros(shape)
        # keep the autograd graph (a zero gradient) so a loss over no windows still backprops
        return empty + 0 * feature_map.sum() if grad else empty
    cells = cells.to(device=feature_map.device, dtype=torch.long)
    _check_cells(cells, height, width)
    if grad:
        return _PoolWindows.apply(feature_map, cells, levels, layout)
    with torch.no_grad():
        few = cells.shape[0] <= _FEW_WINDOWS and layout == "channel" and out is None
        if few and not native_takes(feature_map):
            return _pool_each(feature_map, cells, levels)
        return _pool(feature_map, cells, levels, layout, out)


def _pool_each(feature_map: Tensor, cells: Tensor, levels: Tuple[int, ...]) -> Tensor:
    """The SPP layer on each window's crop: the same bins (``adaptive_max_pool2d``), exact,
    and for a few windows far cheaper than building the range-max table of the whole map
    (fine-tuning that pools windows on demand asks for a few windows per image)."""
    rows = []
    for x1, y1, x2, y2 in cells.tolist():
        crop = feature_map[None, :, y1 : y2 + 1, x1 : x2 + 1]
        rows.append(torch.cat([F.adaptive_max_pool2d(crop, n).reshape(-1) for n in levels]))
    return torch.stack(rows)


def bin_major_order(channels: int, levels: Sequence[int] = DEFAULT_LEVELS) -> Tensor:
    """Where each value of the ``"bin"`` layout sits in the ``"channel"`` layout.

    Returns:
        LongTensor[C * sum(n * n)] ``order``: ``pool_windows(f, c, levels, layout="bin")``
        equals ``pool_windows(f, c, levels)[:, order]``, so a linear map with weight
        ``W`` (``out x D``) on the channel layout is the map with weight ``W[:, order]`` on
        the bin layout (the same products, summed in another order).
    """
    levels = check_levels(levels)
    channel = torch.arange(int(channels))
    parts, start = [], 0
    for n in levels:
        bins = torch.arange(n * n)
        # bin b, channel c of this level: at b * C + c in the bin layout, c * n^2 + b in the other
        parts.append((start + channel[None, :] * (n * n) + bins[:, None]).reshape(-1))
        start += int(channels) * n * n
    return torch.cat(parts)


class _PoolWindows(torch.autograd.Function):
    """Autograd for :func:`pool_windows`, routing each bin's gradient to its maximal cell.

    To find that cell without tracking indices through every max (slow elementwise selects),
    the forward pools the *ranks* of the cells' values (one argsort of the map) with the same
    fast code: a bin's largest rank is its maximal cell, and ranks are distinct, so each bin
    names exactly one cell (ties between equal values are broken by the sort). The backward
    adds each output gradient to that cell with one ``index_add_``.
    """

    @staticmethod
    def forward(
        ctx, feature_map: Tensor, cells: Tensor, levels: Tuple[int, ...], layout: str
    ) -> Tensor:
        feature_map = feature_map.detach()
        out = _pool(feature_map, cells, levels, layout)
        order = feature_map.reshape(-1).argsort()  # cell of each rank, [C * H * W]
        rank_dtype = torch.int32 if order.numel() < 2**31 else torch.int64
        ranks = torch.arange(order.numel(), dtype=rank_dtype, device=order.device)
        rank = torch.empty_like(ranks).scatter_(0, order, ranks)  # rank of each cell
        ctx.save_for_backward(_pool(rank.view(feature_map.shape), cells, levels, layout), order)
        ctx.map_shape = feature_map.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        pooled_rank, order = ctx.saved_tensors
        grad_by_rank = grad_out.new_zeros(order.shape)
        grad_by_rank.index_add_(0, pooled_rank.reshape(-1), grad_out.reshape(-1))
        grad = torch.empty_like(grad_by_rank).scatter_(0, order, grad_by_rank)
        return grad.view(ctx.map_shape), None, None, None


def _pool(
    feature_map: Tensor,
    cells: Tensor,
    levels: Tuple[int, ...],
    layout: str,
    out: Optional[Tensor] = None,
) -> Tensor:
    """The pooling itself, without autograd, for any real or integer dtype.

    Integer values on the CPU: the compiled loop. Otherwise, per chunk of windows: one gather
    of the corner rows its base bins need (``window_pool_table.CornerPlan``), their max into the
    chunk's rows (or a buffer, transposed for the channel layout), then the derived levels.

    Args:
        feature_map (Tensor[C, H, W]), cells (LongTensor[R, 4]) valid, R >= 1, levels checked.
    Returns:
        Tensor[R, C * sum(n * n)] in ``layout``, the map's dtype (``out`` when given).
    """
    bits = SAME_ORDER_INT.get(feature_map.dtype)
    if bits is not None and bool(feature_map.min() >= 0):
        # Non-negative IEEE floats (conv5 after its ReLU) order like their bit patterns read as
        # signed integers, and integer max needs no conversion: on the CPU it runs 3x faster
        # than bfloat16's (the same values come out; -0.0 may lose to an equal +0.0).
        out_bits = None if out is None else out.view(bits)
        pooled = _pool(feature_map.view(bits), cells, levels, layout, out_bits)
        return pooled.view(feature_map.dtype)
    if feature_map.dtype in SIGNED_INTS and feature_map.is_cpu and native_pool_available():
        return pool_native(feature_map, cells, levels, layout, out)  # the same bins, compiled
    channels = feature_map.shape[0]
    num_windows = cells.shape[0]
    num_bins = sum(n * n for n in levels)
    base_levels, sources = pyramid_plan(levels)
    anchors, ka, kb = bin_corners(cells, base_levels)
    table, offsets, widths = build_table(feature_map, ka, kb)
    rows = corner_rows(anchors, ka, kb, offsets, widths)  # [R, 4, B]
    num_base = rows.shape[2]
    chunk = num_windows
    if feature_map.device.type == "cpu":
        row_bytes = 4 * num_base * channels * feature_map.element_size()
        chunk = max(1, min(num_windows, _CHUNK_BYTES // row_bytes))
    starts = level_starts(levels)
    slots = [slice(starts[n], starts[n] + n * n) for n in base_levels]
    plan = plan_corners(rows, chunk, slots, num_bins)

    if out is None:
        out = feature_map.new_empty((num_windows, num_bins * channels))
    gathered = feature_map.new_empty((4 * chunk * num_base, channels))
    work = None if layout == "bin" else feature_map.new_empty((chunk, num_bins, channels))
    for index, start in enumerate(range(0, num_windows, chunk)):
        stop = min(num_windows, start + chunk)
        k = stop - start
        bins = out[start:stop].view(k, num_bins, channels) if work is None else work[:k]
        gather_base_bins(table, plan, index, slice(start, stop), gathered, bins.view(-1, channels))
        derived_levels(bins, levels, sources)
        if work is not None:
            write_channel_major(bins, out[start:stop], levels)
    return out


def _check_out(out: Tensor, shape: Tuple[int, int], feature_map: Tensor, grad: bool) -> None:
    if grad:
        raise ValueError("pool_windows: out= is for pooling without autograd")
    if (tuple(out.shape), out.dtype, out.device) != (shape, feature_map.dtype, feature_map.device):
        raise ValueError(
            f"out must be {feature_map.dtype} {list(shape)} on {feature_map.device}, got "
            f"{out.dtype} {list(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def _check_cells(cells: Tensor, height: int, width: int) -> None:
    x1, y1, x2, y2 = cells.unbind(1)
    bad = (x1 < 0) | (y1 < 0) | (x2 >= width) | (y2 >= height) | (x1 > x2) | (y1 > y2)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"cells must satisfy 0 <= x1 <= x2 < W={width} and 0 <= y1 <= y2 < H={height}; "
            f"{int(bad.sum())} of {cells.shape[0]} rows do not, e.g. row {i}: {cells[i].tolist()}"
        )
