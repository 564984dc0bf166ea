"""Windows on the conv feature map: projection (SPP-net appendix A) and pyramid pooling.

SPP-net computes the conv5 map of an image once and pools each of the ~2,000 proposal windows
from it (sec. 4.1). Two steps:

- :func:`project_windows` maps a window in image pixels to an inclusive range of map cells,
  with the rule of appendix A (each edge to the nearest cell centre, rounded inward).
- :func:`pool_windows` applies the SPP layer to every window's cell range: the same bins as
  :class:`~spp_detect.modeling.spp.SpatialPyramidPooling` (bin ``i`` of ``n`` over a window of
  ``w`` cells starting at ``x1`` covers ``x1 + floor(i*w/n) .. x1 + ceil((i+1)*w/n) - 1``) and
  the same output layout, so a window covering the whole map gives exactly the SPP layer's output.

How :func:`pool_windows` avoids a loop over windows (all bins of all windows in a few big ops):

1. Range-max sparse table. ``T[a][b][y, x] = max(F[y : y + 2^a, x : x + 2^b])`` is built by
   doubling (``T[a][b]`` is the max of two shifted copies of ``T[a][b-1]``, ``T[a][0]`` of
   ``T[a-1][0]``). Any bin of height ``h`` and width ``w`` is then the max of four (overlapping)
   blocks of size ``2^a x 2^b``, ``a = floor(log2 h)``, ``b = floor(log2 w)``, anchored at the bin's
   four corners: four row gathers from the table, stored channels-last so that each gather
   reads ``C`` contiguous values. Only the ``(a, b)`` the bins use are kept.
2. Coarse levels from fine ones. When level ``m`` divides a finer level ``n = m * q``, bins
   ``j*q .. j*q + q - 1`` of level ``n`` cover exactly bin ``j`` of level ``m`` (their first
   start is ``floor(j*w/m)``, their last end ``ceil((j+1)*w/m)``, and neighbouring bins touch or
   overlap), so the 3x3, 2x2 and 1x1 levels are max-reductions of the 6x6 grid: only 36 of
   the 50 bins of the detection pyramid are gathered.
3. On the CPU the windows are processed in chunks whose gather buffer stays in the cache;
   allocating one buffer for all ``4 * R * 36 * C`` gathered values costs several times more
   (page faults and memory traffic) than the gathers themselves.
4. Gradient: the backward sends each bin's gradient to its maximal cell, found by pooling the
   ranks of the cells' values with the same code (see ``_PoolWindows``).
"""

from __future__ import annotations

import operator
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .spp import DEFAULT_LEVELS, check_levels

__all__ = ["project_windows", "pool_windows"]

# Bytes of the per-chunk gather buffer on the CPU (4 row gathers per base bin), small enough to
# stay in cache. CPU time for 2000 windows on a 256 x 43 x 57 map, 1 thread (2-core EPYC, 32 MiB
# L3, best of 7): 2 MiB 184 ms, 4 MiB 200, 8 MiB 238, 16 MiB 251, 32 MiB 269, one chunk ~2x.
_CHUNK_BYTES = 4 << 20


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


def pool_windows(
    feature_map: Tensor, cells: Tensor, levels: Sequence[int] = DEFAULT_LEVELS
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
    Returns:
        Tensor[R, C * sum(n * n)]: dtype and device of ``feature_map``; per window the levels
        in the given order, each flattened as ``(C, n, n)``. ``R = 0`` gives ``[0, C * sum(n*n)]``.
        Differentiable with respect to ``feature_map`` (once): like max pooling, each bin's
        gradient goes to one maximal cell of the bin (when cells tie, to one of them).
    """
    levels = check_levels(levels)
    if feature_map.ndim != 3 or min(feature_map.shape) < 1:
        raise ValueError(
            f"feature_map must be Tensor[C, H, W] with C, H, W >= 1, "
            f"got shape {tuple(feature_map.shape)}"
        )
    if cells.ndim != 2 or cells.shape[1] != 4:
        raise ValueError(f"cells must be LongTensor[R, 4] x1,y1,x2,y2, got {tuple(cells.shape)}")
    if cells.dtype.is_floating_point or cells.is_complex() or cells.dtype == torch.bool:
        raise ValueError(f"cells must be an integer tensor of cell indices, got {cells.dtype}")
    channels, height, width = feature_map.shape
    grad = torch.is_grad_enabled() and feature_map.requires_grad
    if cells.shape[0] == 0:
        empty = feature_map.new_zeros((0, channels * sum(n * n for n in levels)))
        # keep the autograd graph (a zero gradient) so a loss over no windows still backprops
        return empty + 0 * feature_map.sum() if grad else empty
    cells = cells.to(device=feature_map.device, dtype=torch.long)
    _check_cells(cells, height, width)
    if grad:
        return _PoolWindows.apply(feature_map, cells, levels)
    with torch.no_grad():
        return _pool(feature_map, cells, levels)


class _PoolWindows(torch.autograd.Function):
    """Autograd for :func:`pool_windows`, routing each bin's gradient to its maximal cell.

    To find that cell without tracking indices through every max (slow elementwise selects),
    the forward pools the *ranks* of the cells' values (one argsort of the map) with the same
    fast code: a bin's largest rank is its maximal cell, and ranks are distinct, so each bin
    names exactly one cell (ties between equal values are broken by the sort). The backward
    adds each output gradient to that cell with one ``index_add_``.
    """

    @staticmethod
    def forward(ctx, feature_map: Tensor, cells: Tensor, levels: Tuple[int, ...]) -> Tensor:
        feature_map = feature_map.detach()
        out = _pool(feature_map, cells, levels)
        order = feature_map.reshape(-1).argsort()  # cell of each rank, [C * H * W]
        rank_dtype = torch.int32 if order.numel() < 2**31 else torch.int64
        ranks = torch.arange(order.numel(), dtype=rank_dtype, device=order.device)
        rank = torch.empty_like(ranks).scatter_(0, order, ranks)  # rank of each cell
        ctx.save_for_backward(_pool(rank.view(feature_map.shape), cells, levels), order)
        ctx.map_shape = feature_map.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        pooled_rank, order = ctx.saved_tensors
        grad_by_rank = grad_out.new_zeros(order.shape)
        grad_by_rank.index_add_(0, pooled_rank.reshape(-1), grad_out.reshape(-1))
        grad = torch.empty_like(grad_by_rank).scatter_(0, order, grad_by_rank)
        return grad.view(ctx.map_shape), None, None


def _pool(feature_map: Tensor, cells: Tensor, levels: Tuple[int, ...]) -> Tensor:
    """The pooling itself, without autograd, for any real or integer dtype.

    Args:
        feature_map (Tensor[C, H, W]), cells (LongTensor[R, 4]) valid, R >= 1, levels checked.
    Returns:
        Tensor[R, C * sum(n * n)], the layout of :func:`pool_windows`.
    """
    channels = feature_map.shape[0]
    num_windows = cells.shape[0]
    base_levels, sources = _pyramid_plan(levels)
    anchors, ka, kb = _bin_corners(cells, base_levels)
    table, offsets, widths = _build_table(feature_map, ka, kb)
    # Rows of the table holding the 4 corner blocks of every base bin: [R, 4, B].
    rows = _corner_rows(anchors, ka, kb, offsets, widths)
    num_base = rows.shape[2]

    out = feature_map.new_empty((num_windows, channels * sum(n * n for n in levels)))
    chunk = num_windows
    if feature_map.device.type == "cpu":
        row_bytes = 4 * num_base * channels * feature_map.element_size()
        chunk = max(1, min(num_windows, _CHUNK_BYTES // row_bytes))
    gathered = feature_map.new_empty((chunk * 4 * num_base, channels))
    base = feature_map.new_empty((chunk, num_base, channels))
    for start in range(0, num_windows, chunk):
        stop = min(num_windows, start + chunk)
        k = stop - start
        g = gathered[: k * 4 * num_base]
        torch.index_select(table, 0, rows[start:stop].reshape(-1), out=g)
        v = torch.amax(g.view(k, 4, num_base, channels), dim=1, out=base[:k])
        col = 0
        for n, p in zip(levels, _levels_from_base(v, levels, base_levels, sources)):
            dst = out[start:stop, col : col + channels * n * n].view(k, channels, n * n)
            dst.copy_(p.transpose(1, 2))  # (bins, C) -> the SPP layer's (C, n, n) layout
            col += channels * n * n
    return out


def _check_cells(cells: Tensor, height: int, width: int) -> None:
    x1, y1, x2, y2 = cells.unbind(1)
    bad = (x1 < 0) | (y1 < 0) | (x2 >= width) | (y2 >= height) | (x1 > x2) | (y1 > y2)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"cells must satisfy 0 <= x1 <= x2 < W={width} and 0 <= y1 <= y2 < H={height}; "
            f"{int(bad.sum())} of {cells.shape[0]} rows do not, e.g. row {i}: {cells[i].tolist()}"
        )


def _pyramid_plan(levels: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Dict[int, int]]:
    """Split levels into base levels (gathered from the table) and derived ones.

    Returns:
        base_levels: distinct levels that no finer level of the pyramid is a multiple of,
            largest first.
        sources: derived level ``m`` -> the smallest finer level ``n`` with ``n % m == 0``.
    """
    distinct = sorted(set(levels), reverse=True)
    sources: Dict[int, int] = {}
    base: List[int] = []
    for m in distinct:
        finer = [n for n in distinct if n > m and n % m == 0]
        if finer:
            sources[m] = min(finer)
        else:
            base.append(m)
    return tuple(base), sources


def _bins(start: Tensor, length: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """Bins of ``n`` per window: first cell ``[R, n]`` and length ``[R, n]`` (``>= 1``)."""
    i = torch.arange(n, device=start.device)
    lo = (i * length[:, None]) // n  # floor(i * w / n)
    hi = -((-(i + 1) * length[:, None]) // n)  # ceil((i + 1) * w / n), exclusive
    return start[:, None] + lo, hi - lo


def _floor_log2(x: Tensor) -> Tensor:
    """``floor(log2(x))`` for integer ``x >= 1``, exactly (no float log)."""
    k = torch.zeros_like(x)
    for j in range(1, int(x.max()).bit_length()):
        k += x >= (1 << j)
    return k


def _bin_corners(
    cells: Tensor, base_levels: Tuple[int, ...]
) -> Tuple[List[Tuple[Tensor, Tensor, Tensor, Tensor]], List[Tensor], List[Tensor]]:
    """Per base level: the two block anchors on each side of every bin, and the block sizes.

    For a bin starting at ``y0`` with ``h`` cells, ``a = floor(log2 h)`` and the two blocks of
    height ``2^a`` start at ``y0`` and ``y0 + h - 2^a``: together they cover the bin exactly.
    Returns per base level ``(y_first, y_second, x_first, x_second)`` (each ``[R, n]``) and the
    exponents ``ka`` (rows) and ``kb`` (columns), each ``[R, n]``.
    """
    x1, y1, x2, y2 = cells.unbind(1)
    anchors, ka, kb = [], [], []
    for n in base_levels:
        ys, yl = _bins(y1, y2 - y1 + 1, n)
        xs, xl = _bins(x1, x2 - x1 + 1, n)
        a, b = _floor_log2(yl), _floor_log2(xl)
        anchors.append((ys, ys + yl - (1 << a), xs, xs + xl - (1 << b)))
        ka.append(a)
        kb.append(b)
    return anchors, ka, kb


def _build_table(
    feature_map: Tensor, ka: List[Tensor], kb: List[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    """Range-max sparse table, channels-last, with only the block sizes the bins use.

    Returns:
        table (Tensor[M, C]): row ``offsets[a, b] + y * widths[b] + x`` holds
            ``max(feature_map[:, y : y + 2^a, x : x + 2^b])`` (valid anchors only:
            ``y <= H - 2^a``, ``x <= W - 2^b``, so the map of ``(a, b)`` is ``H - 2^a + 1`` rows of
            ``widths[b] = W - 2^b + 1``).
        offsets (LongTensor[A, B]): first row of each ``(a, b)`` map (-1 where not stored).
        widths (LongTensor[B]).
    """
    channels, height, width = feature_map.shape
    max_a = max(int(a.max()) for a in ka)
    max_b = max(int(b.max()) for b in kb)
    # Which (a, b) pairs some bin uses: every row bin of a window meets every column bin.
    pairs = torch.cat(
        [(a[:, :, None] * (max_b + 1) + b[:, None, :]).reshape(-1) for a, b in zip(ka, kb)]
    )
    used = torch.bincount(pairs, minlength=(max_a + 1) * (max_b + 1)).view(max_a + 1, max_b + 1)
    used = (used > 0).tolist()

    widths = [width - (1 << b) + 1 for b in range(max_b + 1)]
    offsets = [[-1] * (max_b + 1) for _ in range(max_a + 1)]
    total = 0
    for a in range(max_a + 1):
        for b in range(max_b + 1):
            if used[a][b]:
                offsets[a][b] = total
                total += (height - (1 << a) + 1) * widths[b]
    table = feature_map.new_empty((total, channels))

    def double(a: int, b: int, v: Tensor, dim: int, shift: int) -> Tensor:
        """Blocks twice as long along ``dim``: the max of two copies shifted by ``shift``,
        written straight into the table when the ``(a, b)`` map is used."""
        v0, v1 = v.narrow(dim, 0, v.shape[dim] - shift), v.narrow(dim, shift, v.shape[dim] - shift)
        if not used[a][b]:
            return torch.maximum(v0, v1)
        dst = table[offsets[a][b] : offsets[a][b] + v0.shape[0] * v0.shape[1]]
        return torch.maximum(v0, v1, out=dst.view(v0.shape))

    column = feature_map.permute(1, 2, 0)  # T[0][0], channels-last [H, W, C]
    if used[0][0]:
        column = table[: height * width].view(height, width, channels).copy_(column)
    else:
        column = column.contiguous()
    last_a = max(a for a in range(max_a + 1) if any(used[a]))
    for a in range(last_a + 1):
        if a > 0:  # T[a][0] from T[a-1][0]: double the height
            column = double(a, 0, column, dim=0, shift=1 << (a - 1))
        row = column
        last_b = max((b for b in range(max_b + 1) if used[a][b]), default=-1)
        for b in range(1, last_b + 1):  # T[a][b] from T[a][b-1]: double the width
            row = double(a, b, row, dim=1, shift=1 << (b - 1))
    device = feature_map.device
    return (
        table,
        torch.tensor(offsets, dtype=torch.long, device=device),
        torch.tensor(widths, dtype=torch.long, device=device),
    )


def _corner_rows(
    anchors: List[Tuple[Tensor, Tensor, Tensor, Tensor]],
    ka: List[Tensor],
    kb: List[Tensor],
    offsets: Tensor,
    widths: Tensor,
) -> Tensor:
    """Table rows of the four corner blocks of every base bin: ``LongTensor[R, 4, B]``.

    ``B`` is the number of base bins per window, base levels in order, each ``n x n`` row-major.
    """
    per_level = []
    for (y0, y1, x0, x1), a, b in zip(anchors, ka, kb):
        num_windows, n = y0.shape
        off = offsets[a[:, :, None], b[:, None, :]]  # [R, n, n]
        wid = widths[b][:, None, :]  # [R, 1, n]
        top, bottom = off + y0[:, :, None] * wid, off + y1[:, :, None] * wid
        left, right = x0[:, None, :], x1[:, None, :]
        corners = torch.stack([top + left, top + right, bottom + left, bottom + right], dim=1)
        per_level.append(corners.reshape(num_windows, 4, n * n))
    return torch.cat(per_level, dim=2)


def _levels_from_base(
    base: Tensor, levels: Tuple[int, ...], base_levels: Tuple[int, ...], sources: Dict[int, int]
) -> List[Tensor]:
    """Per requested level, ``Tensor[R, n * n, C]`` from the base bins ``Tensor[R, B, C]``.

    A derived level ``m`` with source ``n = m * q`` is the max over each ``q x q`` group of the
    source level's bins (exact: see the module docstring).
    """
    num_windows, _, channels = base.shape
    pooled: Dict[int, Tensor] = {}
    start = 0
    for n in base_levels:
        pooled[n] = base[:, start : start + n * n]
        start += n * n
    for m in sorted(sources, reverse=True):  # finer first: a source is ready before its use
        n = sources[m]
        q = n // m
        grid = pooled[n].reshape(num_windows, m, q, m, q, channels)
        # Two single-dim reductions: amax over dims (2, 4) at once is ~20x slower on the CPU.
        pooled[m] = grid.amax(dim=4).amax(dim=2).reshape(num_windows, m * m, channels)
    return [pooled[n] for n in levels]
