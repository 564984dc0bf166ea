"""SPP layer (SPP-net sec. 2.3) against a slow float64 loop with exact rational bin edges."""

from fractions import Fraction
from math import ceil, floor

import pytest
import torch

from spp_detect.modeling import window_pool_native
from spp_detect.modeling.spp import SpatialPyramidPooling, bin_ranges

LEVEL_SETS = [(6, 3, 2, 1), (4, 3, 2, 1)]


@pytest.fixture(autouse=True)
def _one_thread():
    # Thousands of tiny ops: on a busy 2-core machine, intra-op threads wait on each other at
    # every op (seen: 20x slower); one thread keeps this file fast. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ref_bins(size, n):
    """Bin i covers floor(i*size/n) .. ceil((i+1)*size/n) - 1, computed with exact fractions."""
    return [(floor(Fraction(i * size, n)), ceil(Fraction((i + 1) * size, n))) for i in range(n)]


def bin_masks(size, n):
    """Bool[n, size]: mask[i, k] says whether cell k is in bin i (from ref_bins)."""
    mask = torch.zeros(n, size, dtype=torch.bool)
    for i, (start, end) in enumerate(ref_bins(size, n)):
        mask[i, start:end] = True
    return mask


def ref_spp(x, levels):
    """Slow reference in float64: each bin is the max over the cells its masks select.

    Vectorised over bins with masks (an [N, C, n, n, H, W] broadcast) to keep the all-sizes test
    fast; the bins themselves come from ref_bins' exact fractions. Layout (C, n, n) per level.
    """
    n_img, channels, height, width = x.shape
    out = []
    for n in levels:
        rows = bin_masks(height, n)[:, None, :, None]  # [n, 1, H, 1]
        cols = bin_masks(width, n)[None, :, None, :]  # [1, n, 1, W]
        inside = (rows & cols).to(x.device)  # [n, n, H, W]
        values = x[:, :, None, None].double()  # [N, C, 1, 1, H, W]
        masked = torch.where(inside, values, torch.tensor(float("-inf"), dtype=torch.float64))
        out.append(masked.amax(dim=(-2, -1)).reshape(n_img, -1).to(x.dtype))
    return torch.cat(out, dim=1)


def test_bin_ranges_all_sizes():
    for size in range(1, 41):
        for n in range(1, 9):
            starts, ends = bin_ranges(size, n)
            assert starts.dtype == torch.long and starts.shape == (n,)
            assert list(zip(starts.tolist(), ends.tolist())) == ref_bins(size, n)
            # n non-empty bins that cover the side exactly, without gaps
            assert bool((ends > starts).all())
            assert starts[0] == 0 and ends[-1] == size
            assert bool((starts[1:] <= ends[:-1]).all())


def test_bin_ranges_hand_worked():
    # a=5, n=3: the paper's window ceil(5/3)=2, stride floor(5/3)=1 would give 4 windows.
    starts, ends = bin_ranges(5, 3)
    assert starts.tolist() == [0, 1, 3] and ends.tolist() == [2, 4, 5]
    # a < n: the paper's stride floor(2/3) = 0; here every bin is one (shared) cell.
    starts, ends = bin_ranges(2, 3)
    assert starts.tolist() == [0, 0, 1] and ends.tolist() == [1, 2, 2]
    starts, ends = bin_ranges(13, 6)  # ZF-5 conv5 of a 224 input: 13 x 13
    assert starts.tolist() == [0, 2, 4, 6, 8, 10] and ends.tolist() == [3, 5, 7, 9, 11, 13]


@pytest.mark.parametrize("size, n", [(0, 3), (5, 0), (-1, 2)])
def test_bin_ranges_invalid(size, n):
    with pytest.raises(ValueError):
        bin_ranges(size, n)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_spp_matches_loop_all_sizes(levels):
    gen = torch.Generator().manual_seed(0)
    spp = SpatialPyramidPooling(levels)
    for height in range(1, 41):
        for width in range(1, 41):
            x = torch.randn(2, 2, height, width, generator=gen, dtype=torch.float64)
            out = spp(x)
            assert out.shape == (2, 2 * spp.num_bins)
            assert torch.equal(out, ref_spp(x, levels)), (height, width)


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int32]
)
def test_spp_non_negative_and_integer_maps_match_loop(dtype, native, monkeypatch):
    # conv5 after its ReLU (and integer maps) go to the compiled loop when it is built
    # (window_pool_native.pool_maps_native: the batch stacked along its height), else to
    # adaptive_max_pool2d: the same bins either way, checked on every height 1..40.
    if native == "1" and not window_pool_native.native_pool_available():
        pytest.skip("the compiled window pooling is not built")
    if native == "0" and not dtype.is_floating_point:
        pytest.skip("adaptive_max_pool2d has no integer kernels")
    monkeypatch.setenv("SPP_DETECT_NATIVE_POOL", native)
    gen = torch.Generator().manual_seed(2)
    widths = torch.randint(1, 41, (40,), generator=gen).tolist()
    for levels in LEVEL_SETS:
        spp = SpatialPyramidPooling(levels)
        for height, width in zip(range(1, 41), widths):
            x = torch.randn(3, 4, height, width, generator=gen).relu()
            x = (x * 40).to(dtype) if not dtype.is_floating_point else x.to(dtype)
            out = spp(x)
            assert out.dtype == dtype and out.shape == (3, 4 * spp.num_bins)
            assert torch.equal(out, ref_spp(x.double(), levels).to(dtype)), (height, width)
    x = torch.rand(2, 3, 5, 7, generator=gen, requires_grad=True)  # autograd: not compiled
    out = SpatialPyramidPooling()(x)
    assert out.requires_grad and out.grad_fn is not None
    assert SpatialPyramidPooling()(x.detach()[:0]).shape == (0, 3 * 50)


def test_spp_layout_hand_worked():
    # x[c, y, x] = 1000 c + 10 y + x on a 6 x 6 map: level 6 has one cell per bin, so its
    # (C, n, n) block must be the map itself, channel-major; level 1 is the per-channel max.
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(6), torch.arange(6), indexing="ij")
    fmap = (1000 * c + 10 * y + x).double()[None]
    out = SpatialPyramidPooling((6, 1))(fmap)[0]
    assert out.shape == (3 * 37,)
    assert torch.equal(out[: 3 * 36], fmap.flatten())
    assert out[3 * 36 :].tolist() == [55.0, 1055.0, 2055.0]
    out = SpatialPyramidPooling((2,))(fmap)[0].view(3, 2, 2)
    assert out[1].tolist() == [[1022.0, 1025.0], [1052.0, 1055.0]]


def test_spp_attributes():
    spp = SpatialPyramidPooling([6, 3, 2, 1])
    assert spp.levels == (6, 3, 2, 1)
    assert spp.num_bins == 50
    assert spp.output_dim(256) == 12800
    assert SpatialPyramidPooling((4, 3, 2, 1)).num_bins == 30
    assert SpatialPyramidPooling().levels == (6, 3, 2, 1)


@pytest.mark.parametrize("levels", [(), (0, 1), (2.5,), "ab"])
def test_spp_invalid_levels(levels):
    with pytest.raises(ValueError):
        SpatialPyramidPooling(levels)


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 2, 0, 5), (1, 2, 5, 0)])
def test_spp_invalid_input(shape):
    with pytest.raises(ValueError, match="Tensor"):
        SpatialPyramidPooling()(torch.zeros(shape))


def test_spp_gradient_matches_loop():
    gen = torch.Generator().manual_seed(1)
    for height, width in [(1, 1), (5, 3), (13, 13), (7, 40)]:
        x = torch.randn(2, 3, height, width, generator=gen, dtype=torch.float64)
        weight = torch.randn(2, 3 * 50, generator=gen, dtype=torch.float64)
        x1 = x.clone().requires_grad_()
        (SpatialPyramidPooling()(x1) * weight).sum().backward()
        x2 = x.clone().requires_grad_()
        (ref_spp(x2, (6, 3, 2, 1)) * weight).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_spp_low_precision(dtype, device):
    gen = torch.Generator().manual_seed(2)
    for height, width in [(1, 1), (1, 7), (5, 3), (17, 23), (40, 27)]:
        x = torch.randn(2, 8, height, width, generator=gen).to(dtype)
        out = SpatialPyramidPooling()(x.to(device))
        assert out.dtype == dtype and out.device.type == device.type
        # Max pooling only selects values (no arithmetic), so in any dtype it equals the
        # float64 loop on the same values bit for bit: no tolerance is due.
        assert torch.equal(out.cpu(), ref_spp(x.double(), (6, 3, 2, 1)).to(dtype))
