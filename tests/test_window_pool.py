"""Window projection (SPP-net appendix A) and window pyramid pooling against slow references."""

import dataclasses
import importlib.util
import json
import logging
import os
import sys
import types
from fractions import Fraction
from math import ceil, floor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spp_detect.modeling.window_pool as window_pool
import spp_detect.modeling.window_pool_native as window_pool_native
from spp_detect.config import DetectorConfig
from spp_detect.modeling.base import WindowDetector
from spp_detect.modeling.box_regression import BoxRegressor
from spp_detect.modeling.build import build_detector
from spp_detect.modeling.head import FCHead
from spp_detect.modeling.spp import SpatialPyramidPooling
from spp_detect.modeling.spp_net import SPPDetector, permute_fc6_inputs
from spp_detect.modeling.svm import LinearSVMs
from spp_detect.utils import null_timer
from spp_detect.modeling.window_pool import bin_major_order, pool_windows, project_windows

# The last: a level twice and a level derived from a derived one (1 from 2 from 6).
LEVEL_SETS = [(6, 3, 2, 1), (4, 3, 2, 1), (5, 2), (1,), (2, 6, 1, 6)]


@pytest.fixture(autouse=True, params=["native", "table"])
def backend(request, monkeypatch):
    """Every test runs with the compiled CPU pooling (window_pool_native.py) and with the
    tensor method it falls back to: both must give the references' bins."""
    if request.param == "native" and window_pool_native._ext is None:
        pytest.skip("the compiled window pooling is not built (no C compiler at install)")
    monkeypatch.setenv("SPP_DETECT_NATIVE_POOL", "1" if request.param == "native" else "0")
    return request.param


@pytest.fixture(autouse=True)
def _one_thread():
    # Thousands of tiny ops: on a busy 2-core machine, intra-op threads wait on each other at
    # every op (seen: 20x slower); one thread keeps this file fast. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------


def ref_project(window, stride, offset, height, width):
    """Appendix A for one window, in Python floats."""
    x1, y1, x2, y2 = (float(v) for v in window)
    cells = []
    for lo_px, hi_px, size in ((x1, x2, width), (y1, y2, height)):
        lo = floor((lo_px - offset) / stride + 0.5)
        hi = ceil((hi_px - 1 - offset) / stride - 0.5)
        if lo > hi:
            lo = hi = (lo + hi) // 2
        cells.append((min(max(lo, 0), size - 1), min(max(hi, 0), size - 1)))
    (cx1, cx2), (cy1, cy2) = cells
    return [cx1, cy1, cx2, cy2]


def ref_bins(size, n):
    return [(floor(Fraction(i * size, n)), ceil(Fraction((i + 1) * size, n))) for i in range(n)]


def ref_spp(x, levels, layout="channel"):
    """SPP of one map x[C, H, W] in float64: max over each bin's slice, layout (C, n, n) or,
    for ``layout="bin"``, (n, n, C)."""
    out = []
    for n in levels:
        for_level = []
        for y0, y1 in ref_bins(x.shape[1], n):
            for x0, x1 in ref_bins(x.shape[2], n):
                for_level.append(x[:, y0:y1, x0:x1].amax(dim=(1, 2)))
        # [C, n*n] -> (C, n, n), or [n*n, C] -> (n, n, C)
        out.append(torch.stack(for_level, dim=1 if layout == "channel" else 0).reshape(-1))
    return torch.cat(out)


def ref_pool(fmap, cells, levels, layout="channel"):
    """Per-window loop: crop the inclusive cell range, run the reference SPP."""
    rows = [
        ref_spp(fmap[:, y1 : y2 + 1, x1 : x2 + 1], levels, layout)
        for x1, y1, x2, y2 in cells.tolist()
    ]
    return torch.stack(rows)


def random_cells(gen, num, height, width):
    """Valid inclusive cell ranges, plus the whole map, single cells, a full row and column."""
    xs = torch.randint(0, width, (num, 2), generator=gen).sort(dim=1).values
    ys = torch.randint(0, height, (num, 2), generator=gen).sort(dim=1).values
    cells = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)
    special = torch.tensor(
        [
            [0, 0, width - 1, height - 1],
            [0, 0, 0, 0],
            [width - 1, height - 1, width - 1, height - 1],
            [width // 2, height // 2, width // 2, height // 2],
            [0, height - 1, width - 1, height - 1],
            [width - 1, 0, width - 1, height - 1],
        ]
    )
    return torch.cat([cells, special])


def map_sizes(gen):
    """Every height and every width in 1..40, each paired with a random other side."""
    other = torch.randint(1, 41, (80,), generator=gen).tolist()
    tall = [(h, other[h - 1]) for h in range(1, 41)]
    wide = [(other[40 + w - 1], w) for w in range(1, 41)]
    return tall + wide


# ------------------------------------------------------------------------------------------
# project_windows
# ------------------------------------------------------------------------------------------


def test_project_hand_worked():
    # ZF-5: stride 16, cell j centred on pixel 16 j; a 4 x 4 map (a 64 x 64 image).
    windows = torch.tensor(
        [
            [0, 0, 16, 16],  # pixels 0..15: centres 0 and 16 are nearest -> cells 0..1
            [8, 8, 40, 24],  # x: 8 -> floor(1.0) = 1, 39 -> ceil(1.9375) = 2; y: 1, ceil(.9375)
            [24.5, 24.5, 25, 25],  # left 2 > right 1: collapses to (2 + 1) // 2 = 1
            [40, 40, 20, 20],  # inverted: left 3, right ceil(19/16 - .5) = 1 -> cell 2
            [200, 0, 300, 16],  # right of the map: clamped to the last column
            [-40, -40, 10, 10],  # left = floor(-2.5 + .5) = -2 -> 0; right = ceil(0.0625) = 1
            [0, 0, 64, 64],  # the whole image: the whole map
        ]
    )
    cells = project_windows(windows, 16, 0.0, (4, 4))
    assert cells.dtype == torch.long
    assert cells.tolist() == [
        [0, 0, 1, 1],
        [1, 1, 2, 1],
        [1, 1, 1, 1],
        [2, 2, 2, 2],
        [3, 0, 3, 1],
        [0, 0, 1, 1],
        [0, 0, 3, 3],
    ]
    # centre offset 8: x edges 20 -> floor(12/16 + .5) = 1, 59 -> ceil(51/16 - .5) = 3
    # (offset 0 would give 1 and 4)
    assert project_windows(torch.tensor([[20.0, 20, 60, 60]]), 16, 8.0, (10, 10)).tolist() == [
        [1, 1, 3, 3]
    ]
    assert project_windows(torch.tensor([[20.0, 20, 60, 60]]), 16, 0.0, (10, 10)).tolist() == [
        [1, 1, 4, 4]
    ]


@pytest.mark.parametrize("stride, offset", [(16, 0.0), (16, 7.5), (8, -3.0), (1, 0.0), (32, 12.25)])
def test_project_matches_loop(stride, offset):
    gen = torch.Generator().manual_seed(stride)
    height, width = 7, 11
    extent = stride * torch.tensor([width, height, width, height], dtype=torch.float64)
    num = 400
    # anywhere from well left/above of the image to well right/below of it
    corner = (torch.rand(num, 4, generator=gen, dtype=torch.float64) * 1.6 - 0.3) * extent
    size = torch.rand(num, 2, generator=gen, dtype=torch.float64) * stride * 3
    tiny = torch.cat([corner[:, :2], corner[:, :2] + size], dim=1)  # up to 3 cells wide
    zero = torch.cat([corner[:, :2], corner[:, :2]], dim=1)  # zero width and height
    windows = torch.cat([corner, tiny, zero, zero.round(), corner.round()])  # corner: any order
    for dtype in (torch.float64, torch.float32):
        w = windows.to(dtype)
        expected = [ref_project(v, stride, offset, height, width) for v in w.double().tolist()]
        cells = project_windows(w, stride, offset, (height, width))
        assert cells.tolist() == expected
        x1, y1, x2, y2 = cells.unbind(1)
        assert bool(((0 <= x1) & (x1 <= x2) & (x2 < width)).all())
        assert bool(((0 <= y1) & (y1 <= y2) & (y2 < height)).all())


def test_project_integer_windows_and_empty():
    windows = torch.tensor([[0, 0, 16, 16]], dtype=torch.int64)
    assert project_windows(windows, 16, 0.0, (4, 4)).tolist() == [[0, 0, 1, 1]]
    empty = project_windows(torch.zeros(0, 4), 16, 0.0, (4, 4))
    assert empty.shape == (0, 4) and empty.dtype == torch.long


@pytest.mark.parametrize(
    "windows, stride, hw",
    [
        (torch.zeros(3, 5), 16, (4, 4)),
        (torch.zeros(4), 16, (4, 4)),
        (torch.zeros(1, 4), 0, (4, 4)),
        (torch.zeros(1, 4), 16.5, (4, 4)),
        (torch.zeros(1, 4), 16, (0, 4)),
        (torch.tensor([[0.0, 0.0, float("nan"), 4.0]]), 16, (4, 4)),
    ],
)
def test_project_invalid(windows, stride, hw):
    with pytest.raises(ValueError):
        project_windows(windows, stride, 0.0, hw)


# ------------------------------------------------------------------------------------------
# pool_windows
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_pool_matches_loop(levels, monkeypatch):
    gen = torch.Generator().manual_seed(sum(levels))
    num_bins = sum(n * n for n in levels)
    for i, (height, width) in enumerate(map_sizes(gen)):
        fmap = torch.randn(3, height, width, generator=gen, dtype=torch.float64)
        cells = random_cells(gen, 6, height, width)
        expected = ref_pool(fmap, cells, levels)
        out = pool_windows(fmap, cells, levels)  # few windows: one by one (_pool_each)
        assert out.shape == (cells.shape[0], 3 * num_bins) and out.dtype == torch.float64
        assert torch.equal(out, expected), (height, width)
        with monkeypatch.context() as m:  # the same windows through the range-max table
            m.setattr(window_pool, "_FEW_WINDOWS", 0)
            assert torch.equal(pool_windows(fmap, cells, levels), expected), (height, width)
        if i % 4 == 0:
            # autograd path (also records the argmax cells), and one window per CPU chunk
            grad_out = pool_windows(fmap.clone().requires_grad_(), cells, levels)
            assert torch.equal(grad_out.detach(), expected), (height, width)
            with monkeypatch.context() as m:
                m.setattr(window_pool, "_CHUNK_BYTES", 1)
                assert torch.equal(pool_windows(fmap, cells, levels), expected), (height, width)
                grad_out = pool_windows(fmap.clone().requires_grad_(), cells, levels)
                assert torch.equal(grad_out.detach(), expected), (height, width)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_pool_bin_layout_matches_loop(levels, monkeypatch):
    gen = torch.Generator().manual_seed(10 + sum(levels))
    order = bin_major_order(3, levels)
    assert sorted(order.tolist()) == list(range(3 * sum(n * n for n in levels)))
    for i, (height, width) in enumerate(map_sizes(gen)):
        fmap = torch.randn(3, height, width, generator=gen, dtype=torch.float64)
        cells = random_cells(gen, 6, height, width)
        expected = ref_pool(fmap, cells, levels, layout="bin")
        assert torch.equal(ref_pool(fmap, cells, levels)[:, order], expected)
        assert torch.equal(pool_windows(fmap, cells, levels, layout="bin"), expected)
        if i % 4 == 0:
            grad_out = pool_windows(fmap.clone().requires_grad_(), cells, levels, layout="bin")
            assert torch.equal(grad_out.detach(), expected), (height, width)
            with monkeypatch.context() as m:
                m.setattr(window_pool, "_CHUNK_BYTES", 1)
                out = pool_windows(fmap, cells, levels, layout="bin")
                assert torch.equal(out, expected), (height, width)


@pytest.mark.parametrize("layout", ["channel", "bin"])
def test_pool_into_bfloat16_equals_rounded_float32(layout):
    # Rounding is monotonic, so max pooling commutes with it: pooling a float32 map into
    # bfloat16 must equal the float32 result rounded, bit for bit.
    gen = torch.Generator().manual_seed(11)
    for height, width in [(1, 1), (13, 17), (43, 57)]:
        fmap = torch.randn(5, height, width, generator=gen)
        cells = random_cells(gen, 30, height, width)
        ref = ref_pool(fmap.double(), cells, (6, 3, 2, 1), layout).float().bfloat16()
        out = pool_windows(fmap, cells, layout=layout, dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
        assert torch.equal(pool_windows(fmap.bfloat16(), cells, layout=layout), ref)
    assert pool_windows(fmap, cells[:0], dtype=torch.bfloat16).dtype == torch.bfloat16


def test_pool_into_out_block():
    gen = torch.Generator().manual_seed(14)
    fmap = torch.randn(3, 9, 14, generator=gen)
    cells = random_cells(gen, 10, 9, 14)
    pooled = torch.full((30, 3 * 50), float("nan"))
    for layout in ("channel", "bin"):
        got = pool_windows(fmap, cells, layout=layout, out=pooled[5:21])
        assert got.data_ptr() == pooled[5:21].data_ptr()
        assert torch.equal(
            pooled[5:21], ref_pool(fmap.double(), cells, (6, 3, 2, 1), layout).float()
        )
        assert bool(pooled[:5].isnan().all()) and bool(pooled[21:].isnan().all())
    for bad in (pooled[:15], pooled[5:21].double(), pooled[5:21, :-1], torch.empty(150, 16).t()):
        with pytest.raises(ValueError, match="out must"):
            pool_windows(fmap, cells, out=bad)
    with pytest.raises(ValueError, match="autograd"):
        pool_windows(fmap.requires_grad_(), cells, out=pooled[5:21])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_pool_non_negative_maps_match_loop(dtype):
    # conv5 after its ReLU: exact zeros and ties everywhere, here also a -0.0 and an infinity.
    # Such maps are pooled through their bit patterns as integers (window_pool._pool).
    gen = torch.Generator().manual_seed(15)
    for height, width in [(1, 1), (7, 9), (43, 57)]:
        fmap = torch.randn(4, height, width, generator=gen).relu().to(dtype)
        fmap[0, 0, 0], fmap[1, -1, -1] = -0.0, float("inf")
        cells = random_cells(gen, 40, height, width)
        for layout in ("channel", "bin"):
            ref = ref_pool(fmap.double(), cells, (6, 3, 2, 1), layout).to(dtype)
            out = pool_windows(fmap, cells, layout=layout)
            assert out.dtype == dtype and torch.equal(out, ref), (height, width, layout)
            # a few windows: the compiled loop where it is on, else one by one (_pool_each)
            assert torch.equal(pool_windows(fmap, cells[:5], layout=layout), ref[:5])


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_pool_integer_maps_match_loop(dtype, backend, monkeypatch):
    # Integer maps (int8-quantised conv5, the ranks of the gradient path), negatives included,
    # go to the compiled loop when it is built: every level set, both layouts, maps of every
    # side 1..40, and the windows split over threads.
    gen = torch.Generator().manual_seed(16)
    info = torch.iinfo(dtype)
    monkeypatch.setattr(window_pool_native, "_BYTES_PER_THREAD", 1)  # split even tiny outputs
    for levels in LEVEL_SETS:
        order = bin_major_order(5, levels)
        for i, (height, width) in enumerate(map_sizes(gen)[::11]):
            fmap = torch.randint(info.min, info.max, (5, height, width), generator=gen).to(dtype)
            cells = random_cells(gen, 130, height, width)
            ref = ref_pool(fmap.long(), cells, levels)  # exact: int64 maxima
            torch.set_num_threads(1 + i % 2)  # 2 threads: two ranges of windows at once
            for layout, expected in (("channel", ref), ("bin", ref[:, order])):
                out = pool_windows(fmap, cells, levels, layout=layout)
                assert out.dtype == dtype and torch.equal(out.long(), expected), (levels, layout)
    if backend == "native":  # the threads' split: one window per thread at the extreme
        torch.set_num_threads(2)
        ref = ref_pool(fmap.long(), cells[:3], (6, 3, 2, 1), "bin")
        assert torch.equal(pool_windows(fmap, cells[:3], layout="bin").long(), ref)


def test_pool_channels_last_and_offset_maps(backend):
    # A channels-last map is read in place by the compiled loop (no copy): here one image of a
    # channels-last batch (its storage offset is not 0), and a cropped, strided map.
    gen = torch.Generator().manual_seed(17)
    batch = torch.randint(-50, 50, (3, 6, 11, 13), generator=gen, dtype=torch.int8)
    batch = batch.contiguous(memory_format=torch.channels_last)
    cells = random_cells(gen, 40, 11, 13)
    for fmap in (batch[1], batch[2, :, :, :]):
        ref = ref_pool(fmap.long(), cells, (6, 3, 2, 1), "bin")
        assert torch.equal(pool_windows(fmap, cells, layout="bin").long(), ref)
    cropped = batch[0, :, 1:10:2, 2:]  # 5 x 11, strided rows
    cells = random_cells(gen, 40, 5, 11)
    for layout in ("channel", "bin"):
        ref = ref_pool(cropped.long(), cells, (4, 3, 2, 1), layout)
        assert torch.equal(pool_windows(cropped, cells, (4, 3, 2, 1), layout=layout).long(), ref)


def test_native_pool_is_built_and_checks_its_arguments():
    # .ci/run installs with a C compiler: there the compiled pooling must have been built (a
    # silent fallback would leave it untested).
    if os.environ.get("SPP_DETECT_REQUIRE_NATIVE_POOL") == "1":
        assert window_pool_native._ext is not None
    pool = window_pool_native.pool_native
    fmap, cells = torch.zeros(2, 3, 4, dtype=torch.int8), torch.tensor([[0, 0, 3, 2]])
    with pytest.raises(ValueError, match="signed integer"):
        pool(fmap.float(), cells, (1,), "bin")
    for bad in ([[0, 0, 4, 2]], [[0, 0, 3, 3]], [[-1, 0, 3, 2]], [[2, 0, 1, 2]], [[0, 2, 3, 1]]):
        with pytest.raises(ValueError, match="valid ranges on a 3 x 4 map"):
            pool(fmap, torch.tensor(bad), (1,), "bin")
    with pytest.raises(ValueError, match="R >= 1"):
        pool(fmap, cells[:0], (1,), "bin")
    with pytest.raises(ValueError, match="out must"):
        pool(fmap, cells, (1,), "bin", out=torch.empty(1, 2))
    # What the C loop must never be given: it would write or read through a bad address.
    with pytest.raises(ValueError, match="out must"):
        pool(fmap, cells, (1,), "bin", out=torch.empty(1, 2, dtype=torch.int8, device="meta"))
    with pytest.raises(ValueError, match="CPU map"):
        pool(fmap.to("meta"), cells, (1,), "bin")
    with pytest.raises(ValueError, match="share memory"):
        hwc = torch.zeros(3, 4, 2, dtype=torch.int8)  # [H, W, C]: the map read in place
        pool(hwc.permute(2, 0, 1), cells, (1,), "bin", out=hwc.view(-1)[:2].view(1, 2))
    for levels in ((0, 1), (-1,), ()):
        with pytest.raises(ValueError, match="levels"):
            pool(fmap, cells, levels, "bin")
    for bad_cells in (cells.float(), cells[:, :3], cells[0]):
        with pytest.raises(ValueError, match="cells must be integer"):
            pool(fmap, bad_cells, (1,), "bin")
    with pytest.raises(ValueError, match="layout"):
        pool(fmap, cells, (1,), "hwc")


def test_native_pool_refuses_a_missing_or_stale_build(monkeypatch, caplog):
    monkeypatch.setattr(window_pool_native, "_ext", None)
    assert not window_pool_native.native_pool_available()
    with pytest.raises(ValueError, match="not built"):
        window_pool_native.pool_native(
            torch.zeros(2, 3, 4, dtype=torch.int8), torch.tensor([[0, 0, 3, 2]]), (1,), "bin"
        )
    monkeypatch.undo()
    # An in-place build from older C source (ABI mismatch) is not used: a warning, tensor ops.
    name = "spp_detect.modeling._window_pool"
    stale = types.ModuleType(name)
    stale.ABI, stale.__file__ = window_pool_native._ABI - 1, "stale.so"
    real = sys.modules.get(name)
    try:
        monkeypatch.setitem(sys.modules, name, stale)
        if real is not None:  # ``from . import`` reads the package's attribute first
            monkeypatch.setattr(sys.modules["spp_detect.modeling"], "_window_pool", stale)
        with caplog.at_level(logging.WARNING):
            importlib.reload(window_pool_native)
        assert window_pool_native._ext is None and "stale build" in caplog.text
    finally:
        monkeypatch.undo()
        importlib.reload(window_pool_native)
    assert (window_pool_native._ext is None) == (real is None)


def test_pool_bin_layout_gradient_matches_loop():
    gen = torch.Generator().manual_seed(12)
    fmap = torch.randn(3, 17, 12, generator=gen, dtype=torch.float64)
    cells = random_cells(gen, 25, 17, 12)
    weight = torch.randn(cells.shape[0], 3 * 50, generator=gen, dtype=torch.float64)
    f1, f2 = fmap.clone().requires_grad_(), fmap.clone().requires_grad_()
    (pool_windows(f1, cells, layout="bin") * weight).sum().backward()
    (ref_pool(f2, cells, (6, 3, 2, 1), layout="bin") * weight).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-12, atol=1e-12)


def test_pool_whole_map_equals_spp_layer():
    gen = torch.Generator().manual_seed(5)
    for height, width in [(1, 1), (3, 40), (43, 57), (13, 13)]:
        fmap = torch.randn(4, height, width, generator=gen)
        cells = torch.tensor([[0, 0, width - 1, height - 1]] * 2)
        out = pool_windows(fmap, cells)
        expected = SpatialPyramidPooling((6, 3, 2, 1))(fmap[None])
        assert torch.equal(out, expected.expand(2, -1))


def test_pool_int32_cells_and_list_levels():
    gen = torch.Generator().manual_seed(6)
    fmap = torch.randn(2, 9, 14, generator=gen, dtype=torch.float64)
    cells = random_cells(gen, 10, 9, 14)
    out = pool_windows(fmap, cells.int(), [6, 3, 2, 1])
    assert torch.equal(out, ref_pool(fmap, cells, (6, 3, 2, 1)))


@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (5, 2)])
def test_pool_gradient_matches_loop(levels, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    num_bins = sum(n * n for n in levels)
    for height, width in [(1, 1), (6, 9), (17, 12), (40, 33)]:
        fmap = torch.randn(3, height, width, generator=gen, dtype=torch.float64)
        cells = random_cells(gen, 25, height, width)
        weight = torch.randn(cells.shape[0], 3 * num_bins, generator=gen, dtype=torch.float64)
        f2 = fmap.clone().requires_grad_()
        (ref_pool(f2, cells, levels) * weight).sum().backward()
        for chunk_bytes in (window_pool._CHUNK_BYTES, 1):
            monkeypatch.setattr(window_pool, "_CHUNK_BYTES", chunk_bytes)
            f1 = fmap.clone().requires_grad_()
            (pool_windows(f1, cells, levels) * weight).sum().backward()
            torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-12, atol=1e-12)


def test_pool_gradient_with_ties_keeps_total():
    # A constant map ties every cell: each bin's gradient goes to one of its cells, so it must
    # land inside the window and sum to the upstream gradient.
    fmap = torch.zeros(2, 8, 10, dtype=torch.float64, requires_grad=True)
    cells = torch.tensor([[2, 1, 6, 5], [0, 0, 9, 7], [4, 4, 4, 4]])
    weight = torch.rand(3, 2 * 50, dtype=torch.float64)
    (pool_windows(fmap, cells) * weight).sum().backward()
    torch.testing.assert_close(fmap.grad.sum(), weight.sum())
    fmap.grad = None
    (pool_windows(fmap, cells[:1]) * weight[:1]).sum().backward()
    outside = torch.ones(8, 10, dtype=torch.bool)
    outside[1:6, 2:7] = False
    assert bool((fmap.grad[:, outside] == 0).all())
    torch.testing.assert_close(fmap.grad.sum(), weight[0].sum())


# Unit roundoff (half the spacing of values in [1, 2)) of each storage dtype.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def distinct_map(gen, channels, height, width, dtype):
    """A map of distinct values, each exact in float16 (integers of magnitude <= 2048), so
    that the maximal cell of every bin is unique and both dtypes pick the same one."""
    n = channels * height * width
    assert n <= 4096
    values = torch.randperm(n, generator=gen).double() - n // 2
    return values.view(channels, height, width).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_pool_low_precision(dtype, device):
    gen = torch.Generator().manual_seed(8)
    for height, width in [(1, 5), (13, 17), (30, 30)]:
        fmap = distinct_map(gen, 4, height, width, dtype)
        cells = random_cells(gen, 40, height, width)
        leaf = fmap.to(device).requires_grad_()
        out = pool_windows(leaf, cells.to(device))
        assert out.dtype == dtype and out.device.type == device.type
        # Max pooling only selects values (no arithmetic), so in any dtype it equals the
        # float64 loop on the same values bit for bit: no tolerance is due.
        ref_in = fmap.double().requires_grad_()
        ref = ref_pool(ref_in, cells, (6, 3, 2, 1))
        assert torch.equal(out.detach().cpu(), ref.detach().to(dtype))

        # The backward adds up to k output gradients into one cell in the map's dtype; each
        # addition rounds (relative error <= u, the unit roundoff), so recursive summation
        # gives |error| <= (k - 1) * u * sum |g| (Higham, Accuracy and Stability of Numerical
        # Algorithms, sec. 4.2). Reference: float64, exact for these float16 gradients.
        grad_out = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(grad_out.to(device))
        (ref_grad,) = torch.autograd.grad(ref, ref_in, grad_out.double(), retain_graph=True)
        (abs_sum,) = torch.autograd.grad(ref, ref_in, grad_out.double().abs(), retain_graph=True)
        (count,) = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
        bound = (count - 1).clamp(min=0) * UNIT_ROUNDOFF[dtype] * abs_sum
        err = (leaf.grad.cpu().double() - ref_grad).abs()
        assert leaf.grad.dtype == dtype and bool((err <= bound).all()), float((err - bound).max())
        # The bound is not vacuous: cells receiving several gradients exist.
        assert int(count.max()) > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_pool_zero_windows(dtype):
    fmap = torch.randn(5, 6, 7).to(dtype)
    out = pool_windows(fmap, torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == (0, 5 * 50) and out.dtype == dtype
    out = pool_windows(fmap.requires_grad_(), torch.zeros(0, 4, dtype=torch.long), (4, 3, 2, 1))
    assert out.shape == (0, 5 * 30) and out.dtype == dtype
    out.sum().backward()
    assert fmap.grad.shape == fmap.shape and not fmap.grad.any()


@pytest.mark.parametrize(
    "fmap_shape, cells, match",
    [
        ((1, 3, 6, 7), [[0, 0, 1, 1]], "feature_map"),
        ((3, 0, 7), [[0, 0, 1, 1]], "feature_map"),
        ((3, 6, 7), [[0, 0, 1]], "cells"),
        ((3, 6, 7), [[0, 0, 7, 1]], "W=7"),  # x2 = W
        ((3, 6, 7), [[0, 0, 1, 6]], "H=6"),  # y2 = H
        ((3, 6, 7), [[-1, 0, 1, 1]], "cells"),
        ((3, 6, 7), [[3, 0, 2, 1]], "x1 <= x2"),  # inverted
        ((3, 6, 7), [[0.0, 0.0, 1.0, 1.0]], "integer"),
    ],
)
def test_pool_invalid(fmap_shape, cells, match):
    with pytest.raises(ValueError, match=match):
        pool_windows(torch.zeros(fmap_shape), torch.tensor(cells))


def test_pool_invalid_levels_and_layout():
    with pytest.raises(ValueError, match="levels"):
        pool_windows(torch.zeros(2, 3, 3), torch.zeros(1, 4, dtype=torch.long), (3, 0))
    with pytest.raises(ValueError, match="layout"):
        pool_windows(torch.zeros(2, 3, 3), torch.zeros(1, 4, dtype=torch.long), layout="hwc")


def test_bench_pool_agrees_with_roi_pool(tmp_path):
    # torchvision's roi_pool is an independent implementation of the same bins (up to float32
    # rounding of its bin edges): tools/bench_pool.py must find equal outputs where they agree.
    path = Path(__file__).resolve().parents[1] / "tools" / "bench_pool.py"
    spec = importlib.util.spec_from_file_location("bench_pool", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = "--channels 8 --windows 60 --warmup 0 --repeats 1".split()
    args = bench.get_args_parser().parse_args(argv + ["--output", str(tmp_path / "bench.json")])
    result = bench.main(args)
    agree = result["agreement"]
    assert agree["windows_with_same_bins"] > 50
    assert agree["of_those_outputs_equal"] == agree["windows_with_same_bins"]
    assert json.loads((tmp_path / "bench.json").read_text())["windows"] == 60


# ------------------------------------------------------------------------------------------
# SPP-net's test-time copies: bin-layout pooling read by a head with permuted fc6 columns
# ------------------------------------------------------------------------------------------


def _spp_detector(hidden=64):
    c = DetectorConfig()
    config = c.replace(
        model=dataclasses.replace(c.model, backbone="zf5", scales=(96,), hidden=hidden),
        test=dataclasses.replace(c.test, score_thresh=-1e9),
    )
    torch.manual_seed(0)
    det = build_detector("spp", ["a", "b", "c"], config, pretrained=False)
    det.head.input_scale.fill_(0.7)
    det.svms = LinearSVMs(3)
    det.svms.reset_weights(hidden)
    det.svms.weight.normal_()
    det.svms.trained.fill_(True)
    det.svms.set_feature_scale(1.0)
    det.bbox_regressor = BoxRegressor.from_state_dict(
        {
            "weight": torch.randn(3, det.pooled_dim + 1, 4) * 1e-3,
            "target_mean": torch.zeros(3, 4),
            "target_transform": torch.eye(4).repeat(3, 1, 1),
            "feature_scale": torch.tensor(1.0),
            "trained": torch.ones(3, dtype=torch.bool),
            "delta_weights": torch.ones(4),
        }
    )
    return det.eval()


def _image_and_proposals(num=60, height=90, width=120):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    xy = rng.uniform(0, [width - 10, height - 10], (num, 2))
    wh = rng.uniform(8, [width / 1.5, height / 1.5], (num, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [width, height])], axis=1)
    return image, boxes.astype(np.float32)


def test_permute_fc6_inputs_matches_permuted_input():
    gen = torch.Generator().manual_seed(13)
    head = FCHead(40, 3, hidden=12).eval()
    order = torch.randperm(40, generator=gen)
    x = torch.randn(9, 40, generator=gen)
    for h in (head, FCHead(40, 3, hidden=12).compress(6, 0).eval()):
        w = (h.fc6[0] if isinstance(h.fc6, nn.Sequential) else h.fc6).weight.clone()
        p = permute_fc6_inputs(h, order)
        torch.testing.assert_close(p.predict(x[:, order])[1], h.predict(x)[1])
        # the original keeps its weights; everything but fc6's first weight is shared
        first = h.fc6[0] if isinstance(h.fc6, nn.Sequential) else h.fc6
        assert torch.equal(first.weight, w) and p.fc7 is h.fc7 and p.cls_score is h.cls_score
    with pytest.raises(ValueError, match="fc6"):
        permute_fc6_inputs(head, order[:10])


def test_trained_and_unchanged_heads_keep_the_channel_layout():
    det = _spp_detector()
    assert det.pooled_layout == "channel"
    for fields in ({}, {"fast_conv": "channels_last"}, {"score_thresh": 0.0}):
        copy = det.with_settings(**fields)
        assert copy.pooled_layout == "channel" and copy.head is det.head
        assert copy.bbox_regressor is det.bbox_regressor


@pytest.mark.parametrize(
    "fields",
    [
        {"svd_fc6": 16, "svd_fc7": 8},
        {"fast_head": "int8"},
        {"fast_head": "int8", "svd_fc6": 16, "svd_fc7": 8},
        {"fast_head": "bf16"},
        {"fast_head": "bf16", "svd_fc6": 16, "fast_conv": "bf16"},
    ],
)
def test_bin_layout_detector_equals_channel_layout(fields, monkeypatch):
    det = _spp_detector()
    before = {k: v.clone() for k, v in det.state_dict().items()}
    fast = det.with_settings(**fields)
    with monkeypatch.context() as m:  # the same settings without the layout switch
        m.setattr(SPPDetector, "configure_test_head", WindowDetector.configure_test_head)
        ref = det.with_settings(**fields)
    assert (fast.pooled_layout, ref.pooled_layout, det.pooled_layout) == (
        "bin",
        "channel",
        "channel",
    )
    assert all(torch.equal(v, before[k]) for k, v in det.state_dict().items())
    bf16 = fields.get("fast_head") == "bf16"
    image, proposals = _image_and_proposals()

    # Pooled features: the same values, permuted, in the head's dtype (no float32 round trip).
    x = det.preprocess(image)
    windows = torch.from_numpy(proposals)
    got, inverse = fast.compute_pooled(x, windows, null_timer())
    want, ref_inverse = ref.compute_pooled(x, windows, null_timer())
    order = window_pool.bin_major_order(det.backbone.out_channels, det.config.model.levels)
    assert got.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert want.dtype == torch.float32  # the channel layout: as before, float32
    assert torch.equal(inverse, ref_inverse) and torch.equal(got, want[:, order].to(got.dtype))

    if bf16:
        # bfloat16 products summed in another order: within bf16's rounding of fc6's output.
        fc7, ref_fc7 = fast.head.fc7_features(got), ref.head.fc7_features(want)
        torch.testing.assert_close(fc7, ref_fc7, rtol=2e-2, atol=2e-2 * float(ref_fc7.abs().max()))
        deltas = fast.bbox_regressor.predict_deltas(got)
        ref_deltas = ref.bbox_regressor.predict_deltas(want)
        assert deltas.dtype == torch.float32
        torch.testing.assert_close(
            deltas, ref_deltas, rtol=2e-2, atol=2e-2 * float(ref_deltas.abs().max())
        )
        d = fast.detect(image, proposals)
        assert len(d) > 20 and d.boxes.dtype == d.scores.dtype == torch.float32
        return
    a, b = fast.detect(image, proposals), ref.detect(image, proposals)
    assert len(b) > 20 and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(
        a.scores, b.scores, rtol=1e-5, atol=1e-5 * float(b.scores.abs().max())
    )
    torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-5, atol=1e-4)


def test_bin_layout_multi_scale_pooling_equals_channel_layout(monkeypatch):
    # Several scales: each scale's windows are pooled into their block of the result (out=).
    det = _spp_detector()
    fields = {"scales": (64, 112), "fast_head": "bf16"}
    fast = det.with_settings(**fields)
    with monkeypatch.context() as m:
        m.setattr(SPPDetector, "configure_test_head", WindowDetector.configure_test_head)
        ref = det.with_settings(**fields)
    image, proposals = _image_and_proposals(num=80)
    x, windows = det.preprocess(image), torch.from_numpy(proposals)
    got, inverse = fast.compute_pooled(x, windows, null_timer())
    want, ref_inverse = ref.compute_pooled(x, windows, null_timer())
    order = window_pool.bin_major_order(det.backbone.out_channels, det.config.model.levels)
    maps = fast.conv_maps(x)
    assert len({tuple(m.shape) for m in maps}) == 2 and got.dtype == torch.bfloat16
    assert torch.equal(inverse, ref_inverse)
    # (tests/test_detector.py checks the channel layout of several scales against crops)
    assert torch.equal(got, want[:, order].bfloat16())


def test_bench_pool_variants_are_exact(tmp_path, backend):
    path = Path(__file__).resolve().parents[1] / "tools" / "bench_pool.py"
    spec = importlib.util.spec_from_file_location("bench_pool", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    baseline = Path(window_pool.__file__)  # this version as its own baseline
    argv = "--variants --channels 8 --windows 60 --warmup 0 --repeats 1 --threads 1".split()
    args = bench.get_args_parser().parse_args(argv + ["--baseline", str(baseline)])
    result = bench.main(args)["variants"]
    # The layout/dtype variants and test.fast_head=int8map's int8 pooling (each also by the
    # tensor method where the compiled one is on), and the baseline.
    pooled = (len(bench.VARIANTS) + 1) * (2 if backend == "native" else 1)
    assert len(result["exact"]) == pooled + 1 and all(result["exact"].values())
    assert set(result["ms"]["1"]) == set(result["cpu_ms"]["1"])
    assert len(result["ms"]["1"]) == pooled + 5  # + tables and output-write bounds, 2 dtypes


@pytest.mark.cuda
def test_pool_and_project_cuda_match_cpu():
    gen = torch.Generator().manual_seed(9)
    for height, width in [(1, 1), (13, 17), (43, 57)]:
        fmap = torch.randn(8, height, width, generator=gen)
        cells = random_cells(gen, 50, height, width)
        out = pool_windows(fmap.cuda(), cells.cuda())
        assert out.is_cuda
        assert torch.equal(out.cpu(), ref_pool(fmap.double(), cells, (6, 3, 2, 1)).float())
        windows = torch.rand(20, 4, generator=gen) * 700
        assert torch.equal(
            project_windows(windows.cuda(), 16, 0.0, (height, width)).cpu(),
            project_windows(windows, 16, 0.0, (height, width)),
        )
        fmap_grad = fmap.double().cuda().requires_grad_()
        pool_windows(fmap_grad, cells.cuda()).sum().backward()
        ref_in = fmap.double().requires_grad_()
        ref_pool(ref_in, cells, (6, 3, 2, 1)).sum().backward()
        # randn values are distinct, so both pick the same cells; float64 sums of ones are exact.
        assert torch.equal(fmap_grad.grad.cpu(), ref_in.grad)
