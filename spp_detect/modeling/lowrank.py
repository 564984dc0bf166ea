"""Low-rank fc layers from their responses (Zhang, Zou, He, Sun, "Efficient and Accurate
Approximations of Nonlinear Convolutional Networks", CVPR 2015, sec. 3.1).

Truncated SVD (Fast R-CNN) keeps the largest singular values of a layer's weight ``W``; it is
accurate when ``W``'s spectrum decays, as for ImageNet-trained fc layers. Our fc6/fc7 start from
random init and are fine-tuned on a few thousand windows, so most of ``W`` is its flat random
start and a rank-1024/256 SVD loses nearly all of a toy model's mAP (docs/speed.md). What the
next layer sees, though, are the responses ``y = W x + b`` of real windows, and those live near
a low-dimensional subspace because the pooled conv features ``x`` do. Zhang et al. approximate
``y`` by its projection on the top-``k`` principal directions ``P`` (``out x k``) of the
responses over training data:

    y ~ ybar + P P^T (y - ybar) = P (P^T W) x + [P P^T (b - ybar) + ybar]

i.e. two layers, ``in -> k`` with weight ``P^T W`` and ``k -> out`` with weight ``P`` and that
bias: ``k * (in + out)`` multiply-adds instead of ``in * out``, as with the SVD, but with the
error the data actually sees minimised (the residual is the sum of the dropped eigenvalues of
the response covariance). The statistics (mean and leading eigenvectors of each layer's
responses) are measured once on training windows (``training/head_stats.py``) and saved in the
model; the low-rank layers are a test-time copy (``test.svd_method="responses"``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

__all__ = ["ResponseMoments", "response_lowrank_linear", "check_head_stats"]


class ResponseMoments:
    """Running mean and covariance of a layer's responses, in float64 (sums, then one
    eigen-decomposition; the order of the updates does not matter beyond rounding).

    Args:
        dim: the layer's output width.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.count = 0
        self._shift: Optional[Tensor] = None  # the first batch's mean: no cancellation later
        self._sum = torch.zeros(self.dim, dtype=torch.float64)
        self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, y: Tensor) -> None:
        """Add responses ``Tensor[N, dim]`` (products in float32 about a fixed shift, sums in
        float64)."""
        if y.ndim != 2 or y.shape[1] != self.dim:
            raise ValueError(f"responses must be Tensor[N, {self.dim}], got {tuple(y.shape)}")
        y = y.detach().to("cpu", torch.float32)
        if self._shift is None:
            self._shift = y.mean(dim=0)
        z = y - self._shift
        self.count += int(y.shape[0])
        self._sum += z.sum(dim=0, dtype=torch.float64)
        self._outer += (z.t() @ z).double()

    def finalize(self, max_rank: int) -> Dict[str, Any]:
        """``{"mean": [dim], "basis": [dim, r], "eigenvalues": [r], "total_variance",
        "count"}`` (float32 tensors, eigenvalues decreasing, ``r = min(max_rank, dim)``)."""
        if self.count < 2 or self._shift is None:
            raise ValueError("response statistics need at least 2 windows")
        mz = self._sum / self.count
        cov = self._outer / self.count - torch.outer(mz, mz)
        evals, evecs = torch.linalg.eigh((cov + cov.t()) / 2)  # ascending
        r = min(int(max_rank), self.dim)
        total = float(evals.clamp(min=0).sum())
        evals, evecs = evals.flip(0)[:r], evecs.flip(1)[:, :r]
        return {
            "mean": (self._shift.double() + mz).float(),
            "basis": evecs.float().contiguous(),
            "eigenvalues": evals.clamp(min=0).float(),
            "total_variance": total,
            "count": self.count,
        }


def check_head_stats(stats: Optional[Dict[str, Any]], fc6_rank: int, fc7_rank: int) -> None:
    """Raise ``ValueError`` unless ``stats`` holds enough directions for the ranks asked."""
    if stats is None:
        raise ValueError(
            "svd_method='responses' needs the response statistics that training saves in "
            "model.pt (models trained before them: retrain, or use svd_method='weights')"
        )
    for name, rank in (("fc6", fc6_rank), ("fc7", fc7_rank)):
        if rank and stats[name]["basis"].shape[1] < rank:
            raise ValueError(
                f"{name}: {stats[name]['basis'].shape[1]} response directions saved, "
                f"rank {rank} asked"
            )


@torch.no_grad()
def response_lowrank_linear(
    layer: nn.Linear, layer_stats: Dict[str, Any], rank: int
) -> nn.Sequential:
    """``layer`` (``y = W x + b``) as ``in -> rank -> out`` through its top-``rank`` response
    directions (see the module docstring).

    Args:
        layer: a trained ``nn.Linear`` (not changed).
        layer_stats: ``ResponseMoments.finalize`` of its responses (``mean``, ``basis``).
        rank: directions kept, ``1 <= rank < min(in, out)``.
    Returns:
        ``nn.Sequential(Linear(in, rank, bias=False), Linear(rank, out))``.
    """
    out_f, in_f = layer.weight.shape
    if not 1 <= rank < min(out_f, in_f):
        raise ValueError(f"low-rank fc: rank must lie in [1, {min(out_f, in_f) - 1}], got {rank}")
    basis = layer_stats["basis"]
    if basis.shape[0] != out_f or basis.shape[1] < rank:
        raise ValueError(
            f"response basis {tuple(basis.shape)} does not fit a layer of {out_f} outputs at "
            f"rank {rank}"
        )
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(out_f)
    p = basis[:, :rank].to(w)
    ybar = layer_stats["mean"].to(w)
    first = nn.Linear(in_f, rank, bias=False)
    second = nn.Linear(rank, out_f)
    first.weight.copy_((p.t() @ w).to(layer.weight.dtype))
    second.weight.copy_(p.to(layer.weight.dtype))
    second.bias.copy_((p @ (p.t() @ (b - ybar)) + ybar).to(layer.weight.dtype))
    return nn.Sequential(first, second).to(layer.weight.device)
