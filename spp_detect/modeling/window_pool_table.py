"""Range-max sparse table over a conv map and the table rows of every pooling bin's corners.

The machinery behind :func:`~spp_detect.modeling.window_pool.pool_windows` (see its module
docstring): ``T[a][b][y, x] = max(F[:, y : y + 2^a, x : x + 2^b])`` is built by doubling, and a
bin of height ``h`` and width ``w`` is the max of four (overlapping) ``2^a x 2^b`` blocks,
``a = floor(log2 h)``, ``b = floor(log2 w)``, anchored at its four corners. Then, per chunk of
windows, the gathered corners become the bins of the pyramid (base levels), the coarse levels
are reduced from their finer source, and the channel layout is written from the bin layout.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

import torch
from torch import Tensor

__all__ = [
    "pyramid_plan",
    "bin_corners",
    "build_table",
    "corner_rows",
    "level_starts",
    "CornerPlan",
    "plan_corners",
    "gather_base_bins",
    "derived_levels",
    "write_channel_major",
]


def pyramid_plan(levels: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Dict[int, int]]:
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


def bin_corners(
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


def build_table(
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


def corner_rows(
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


def level_starts(levels: Tuple[int, ...]) -> Dict[int, int]:
    """First bin of each distinct level in a pooled vector (levels in order, n * n bins each)."""
    starts: Dict[int, int] = {}
    pos = 0
    for n in levels:
        starts.setdefault(n, pos)
        pos += n * n
    return starts


class CornerPlan(NamedTuple):
    """The table rows to gather for each chunk of windows: only the corners each bin needs.

    A bin whose height is a power of two has ``y_first == y_second``, so its top and bottom
    blocks are the same rows of the table; likewise for the width. Such bins need 2 or 1 of
    their 4 corners (for 2,000 ZF-5 proposal-like windows on a 43 x 57 map, half of the 6x6
    bins need 1, 42% need 2, 8% need 4: 1.66 gathers per bin instead of 4). Each chunk's bins
    are sorted into runs needing the top-left corner only, also the top-right, all four, also
    the bottom-left, so that each extra corner is needed by one contiguous run.

    Fields:
        rows (LongTensor[G]): per chunk, the top-left rows of all its sorted bins, then the
            top-right rows of runs 2-3, the bottom-left rows of runs 3-4, the bottom-right
            rows of run 3.
        unsort (LongTensor[R * N]): for each of the ``N`` bins of each window's pooled vector,
            the position in its chunk's sorted bins of the base bin that fills it (0 for the
            bins of derived levels, which are filled afterwards).
        runs: per chunk, its first entry in ``rows`` and the lengths of its 4 runs.
        num_bins: ``N``.
    """

    rows: Tensor
    unsort: Tensor
    runs: List[Tuple[int, int, int, int, int]]
    num_bins: int


def plan_corners(rows: Tensor, chunk: int, slots: List[slice], num_bins: int) -> CornerPlan:
    """:class:`CornerPlan` for corner rows ``LongTensor[R, 4, B]`` (top-left, top-right,
    bottom-left, bottom-right) processed ``chunk`` windows at a time; ``slots``: where each
    base level's bins go among the ``num_bins`` bins of a pooled vector."""
    num_windows, _, num_base = rows.shape
    x_differ = rows[:, 0] != rows[:, 1]  # [R, B]: the width is not a power of two
    y_differ = rows[:, 0] != rows[:, 2]
    run = y_differ.to(torch.int16) * 2 + (x_differ != y_differ).to(torch.int16)
    chunk_of = torch.arange(num_windows, device=rows.device) // chunk
    num_chunks = int(chunk_of[-1]) + 1
    # Sort by (chunk, run); the keys are small: a narrow dtype sorts several times faster.
    key = (chunk_of[:, None] * 4 + run).view(-1)
    narrow = torch.int16 if num_chunks * 4 <= torch.iinfo(torch.int16).max else torch.int64
    order = torch.argsort(key.to(narrow), stable=True)
    counts = torch.bincount(key, minlength=num_chunks * 4).view(num_chunks, 4).tolist()
    ranks = torch.arange(order.numel(), device=order.device)
    position = torch.empty_like(order).scatter_(0, order, ranks).view(num_windows, num_base)
    position -= (chunk_of * (chunk * num_base))[:, None]  # within the chunk
    unsort = position.new_zeros((num_windows, num_bins))
    first = 0
    for dst in slots:
        size = dst.stop - dst.start
        unsort[:, dst] = position[:, first : first + size]
        first += size
    corners = rows.transpose(0, 1).reshape(4, -1).index_select(1, order)  # sorted bins
    pieces, runs, start, entry = [], [], 0, 0
    for n0, n1, n3, n2 in counts:
        tl, tr, bl, br = corners[:, start : start + n0 + n1 + n3 + n2]
        pieces += [tl, tr[n0 : n0 + n1 + n3], bl[n0 + n1 :], br[n0 + n1 : n0 + n1 + n3]]
        runs.append((entry, n0, n1, n3, n2))
        start += n0 + n1 + n3 + n2
        entry += n0 + 2 * n1 + 4 * n3 + 2 * n2
    return CornerPlan(torch.cat(pieces), unsort.view(-1), runs, num_bins)


def gather_base_bins(
    table: Tensor, plan: CornerPlan, index: int, windows: slice, gathered: Tensor, bins: Tensor
) -> None:
    """Base bins of one chunk of windows: the max of the corner blocks each needs.

    Args:
        table (Tensor[M, C]): the sparse table; plan: its :class:`CornerPlan`.
        index: the chunk's number; windows: its windows (``k`` of them).
        gathered (Tensor[>= 4 * k * B, C]): scratch.
        bins (Tensor[k * N, C]): the chunk's pooled vectors (bin layout, contiguous); the base
            bins are written, the others get values to be overwritten.
    """
    entry, n0, n1, n3, n2 = plan.runs[index]
    num = n0 + n1 + n3 + n2
    size = n0 + 2 * n1 + 4 * n3 + 2 * n2
    g = torch.index_select(table, 0, plan.rows[entry : entry + size], out=gathered[:size])
    best = g[:num]  # the top-left blocks, then the other corners, as CornerPlan.rows
    tr, bl, br = g[num:].split([n1 + n3, n3 + n2, n3])
    a, b = n0 + n1, n0 + n1 + n3  # run 3 (all four corners): [a, b)
    torch.maximum(best[n0:b], tr, out=best[n0:b])
    torch.maximum(best[a:], bl, out=best[a:])
    torch.maximum(best[a:b], br, out=best[a:b])
    unsort = plan.unsort[windows.start * plan.num_bins : windows.stop * plan.num_bins]
    torch.index_select(best, 0, unsort, out=bins)


def derived_levels(bins: Tensor, levels: Tuple[int, ...], sources: Dict[int, int]) -> None:
    """Fill the derived levels of ``bins[k, num_bins, C]`` (bin layout) from their sources, and
    repeated levels from their first occurrence.

    A derived level ``m`` with source ``n = m * q`` is the max over each ``q x q`` group of the
    source level's bins (exact: see the module docstring).
    """
    k, _, channels = bins.shape
    starts = level_starts(levels)

    def level(n: int) -> Tensor:
        return bins[:, starts[n] : starts[n] + n * n].view(k, n, n, channels)

    for m in sorted(sources, reverse=True):  # finer first: a source is ready before its use
        src, q, dst = level(sources[m]), sources[m] // m, level(m)
        # Rows of each group first (strided views: vectorised over C), then columns.
        rows = torch.maximum(src[:, 0::q], src[:, 1::q])  # [k, m, n, C]
        for i in range(2, q):
            torch.maximum(rows, src[:, i::q], out=rows)
        torch.maximum(rows[:, :, 0::q], rows[:, :, 1::q], out=dst)
        for j in range(2, q):
            torch.maximum(dst, rows[:, :, j::q], out=dst)
    pos = 0
    for n in levels:
        if pos != starts[n]:  # a level given twice: copy its first occurrence
            bins[:, pos : pos + n * n].copy_(bins[:, starts[n] : starts[n] + n * n])
        pos += n * n


def write_channel_major(bins: Tensor, out: Tensor, levels: Tuple[int, ...]) -> None:
    """``bins[k, num_bins, C]`` (bin layout) -> ``out[k, C * num_bins]`` (channel layout)."""
    k, _, channels = bins.shape
    pos = 0
    for n in levels:
        dst = out[:, pos * channels : (pos + n * n) * channels].view(k, channels, n * n)
        dst.copy_(bins[:, pos : pos + n * n].transpose(1, 2))  # (bins, C) -> (C, n, n)
        pos += n * n
