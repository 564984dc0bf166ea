"""The spatial pyramid pooling (SPP) layer of SPP-net (He et al., 2014, sec. 2.3).

A conv map of any size ``H x W`` is max-pooled into a fixed ``n x n`` grid of bins for every
pyramid level ``n``; the flattened bins of all levels form a vector of fixed length
``C * sum(n * n)``, whatever the input size. This is what lets SPP-net feed images of any size
and aspect (classification) and windows of any shape (detection) to fixed-size fc layers.

Bin rule used throughout spp_detect (this module and ``window_pool.py``): on a side of length
``a``, bin ``i`` of ``n`` covers cells ``floor(i * a / n) .. ceil((i + 1) * a / n) - 1``.
"""

from __future__ import annotations

import operator
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .window_pool_native import native_takes, pool_maps_native

__all__ = ["bin_ranges", "check_levels", "SpatialPyramidPooling"]

# The paper's detection pyramid (sec. 4.1): 6x6, 3x3, 2x2 and 1x1 bins, 50 bins in all.
DEFAULT_LEVELS: Tuple[int, ...] = (6, 3, 2, 1)


def check_levels(levels: Sequence[int]) -> Tuple[int, ...]:
    """Validate pyramid levels: a non-empty sequence of positive ints; returns them as a tuple."""
    try:
        out = tuple(operator.index(n) for n in levels)
    except TypeError:
        raise ValueError(f"levels must be a sequence of positive ints, got {levels!r}") from None
    if not out or any(n < 1 for n in out):
        raise ValueError(f"levels must be a non-empty sequence of positive ints, got {levels!r}")
    return out


def bin_ranges(size: int, n: int) -> Tuple[Tensor, Tensor]:
    """The ``n`` pooling bins over a side of ``size`` cells.

    Bin ``i`` covers cells ``floor(i * size / n) .. ceil((i + 1) * size / n) - 1``. Every bin is
    non-empty and the bins cover the side exactly (neighbours may share one cell when ``size`` is
    not a multiple of ``n``, and every bin is a single shared cell when ``size < n``).

    The paper (sec. 2.3) describes level ``n`` on an ``a x a`` map as a sliding max pool with
    window ``ceil(a / n)`` and stride ``floor(a / n)``. That form does not always give ``n`` bins:
    for ``a = 5, n = 3`` the window is 2 and the stride 1, giving 4 bins (or 3 bins that miss the
    last cell); for ``a < n`` the stride is 0. The rule above (what the original C++ code
    computes per window) always gives ``n`` bins: for ``a = 5, n = 3`` they are cells
    ``0..1, 1..3, 3..4``; for ``a = 2, n = 3`` they are ``0, 0..1, 1``.

    Args:
        size: side length in cells, ``>= 1``.
        n: number of bins, ``>= 1``.
    Returns:
        starts (LongTensor[n]), ends (LongTensor[n]): cell ranges ``[start, end)`` (ends exclusive).
    """
    size, n = int(size), int(n)
    if size < 1 or n < 1:
        raise ValueError(f"bin_ranges needs size >= 1 and n >= 1, got size={size}, n={n}")
    i = torch.arange(n, dtype=torch.long)
    starts = (i * size) // n
    ends = -((-(i + 1) * size) // n)  # ceil((i + 1) * size / n) in exact integer arithmetic
    return starts, ends


class SpatialPyramidPooling(nn.Module):
    """Spatial pyramid max pooling (SPP-net sec. 2.3).

    ``Tensor[N, C, H, W]`` (any ``H, W >= 1``) -> ``Tensor[N, C * sum(n * n)]``, same dtype and
    device. Bins follow :func:`bin_ranges` (every level always has ``n x n`` non-empty bins; see
    there why the paper's window/stride description is not used). Output layout: the levels in
    the given order, each flattened as ``(C, n, n)`` (row-major: channel, bin row, bin column).

    Differentiable (the gradient of a bin goes to its maximal cell); CPU and CUDA; float32,
    float64, float16 and bfloat16 (max pooling is exact in any dtype). Without autograd, a CPU
    map without negative values (conv5 after its ReLU) goes to the compiled loop of
    ``window_pool_native.py`` where it is built: the same bins, ~6x faster than
    ``adaptive_max_pool2d`` for R-CNN's batches of 64 ZF-5 crops.

    Args:
        levels: bins per side of each pyramid level, e.g. ``(6, 3, 2, 1)`` for detection and
            ``(4, 3, 2, 1)`` or ``(6, 3, 2, 1)`` for classification (the paper's pyramids).
    """

    def __init__(self, levels: Sequence[int] = DEFAULT_LEVELS) -> None:
        super().__init__()
        self.levels: Tuple[int, ...] = check_levels(levels)

    @property
    def num_bins(self) -> int:
        """Bins per channel, ``sum(n * n)`` (50 for the detection pyramid)."""
        return sum(n * n for n in self.levels)

    def output_dim(self, channels: int) -> int:
        """Length of the pooled vector for a map of ``channels`` channels."""
        return int(channels) * self.num_bins

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[-1] < 1 or x.shape[-2] < 1:
            raise ValueError(
                f"SpatialPyramidPooling expects Tensor[N, C, H, W] with H, W >= 1, "
                f"got shape {tuple(x.shape)}"
            )
        if not (torch.is_grad_enabled() and x.requires_grad) and x.shape[0] and native_takes(x):
            # The compiled loop of window_pool_native.py, the same bins (R-CNN pools each of
            # its ~2,000 windows' conv5 maps per image here).
            return pool_maps_native(x, self.levels)
        n_img = x.shape[0]
        # adaptive_max_pool2d computes exactly the bins of bin_ranges (start = floor(i*a/n),
        # end = ceil((i+1)*a/n), integer arithmetic); tests/test_spp.py checks this against a
        # float64 loop for every size 1..40 on both sides.
        channels = x.shape[1]
        pooled = [F.adaptive_max_pool2d(x, n).reshape(n_img, channels * n * n) for n in self.levels]
        return torch.cat(pooled, dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
