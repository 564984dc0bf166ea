"""Closed-form ridge regression in float64 (R-CNN's ``ridge_reg_chol``), for the box regressors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["NormalEquations", "ridge_solve", "ridge_solve_with_bias", "ridge_memory"]


def ridge_solve(x: Tensor, y: Tensor, lambda_: float, method: str = "auto") -> Tensor:
    """``argmin_B ||x B - y||^2 + lambda_ ||B||^2`` in closed form, in float64.

    Primal: ``(x^T x + lambda I) B = x^T y`` (a D x D Cholesky solve, as R-CNN's
    ``ridge_reg_chol``); dual (kernel) form: ``B = x^T (x x^T + lambda I)^-1 y`` (an N x N
    solve). Both are the same minimiser; "auto" takes the smaller system (the dual for a few
    thousand 12,800-D SPP windows).

    Args:
        x (Tensor[N, D]), y (Tensor[N, T]): any float dtype and device.
        lambda_: positive ridge weight.
        method: "auto", "primal" or "dual".
    Returns:
        Tensor[D, T] float64 on the device of ``x``.
    """
    _check(x, y, lambda_, method)
    x = x.double()
    y = y.to(device=x.device, dtype=torch.float64)
    n, d = x.shape
    if method == "auto":
        method = "dual" if n < d else "primal"
    if method == "primal":
        gram = x.T @ x
        gram.diagonal().add_(lambda_)
        chol = torch.linalg.cholesky(gram)
        return torch.cholesky_solve(x.T @ y, chol)
    kernel = x @ x.T
    kernel.diagonal().add_(lambda_)
    chol = torch.linalg.cholesky(kernel)
    return x.T @ torch.cholesky_solve(y, chol)


def _check(x: Tensor, y: Tensor, lambda_: float, method: str) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"ridge_solve: need x[N, D], y[N, T], got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if lambda_ <= 0:
        raise ValueError(f"ridge_solve: lambda_ must be positive, got {lambda_}")
    if method not in ("auto", "primal", "dual"):
        raise ValueError(f"ridge_solve: method must be auto, primal or dual, got {method!r}")


def ridge_solve_with_bias(
    x: Tensor, y: Tensor, lambda_: float, regularize_bias: bool, method: str
) -> Tensor:
    """Tensor[D + 1, 4]: ridge weights with the bias in the last row."""
    if regularize_bias:
        # R-CNN / SPP_net: a constant-1 feature, penalised like the others.
        return _ridge_with_ones(x, y, lambda_, method)
    x_mean = x.mean(dim=0)
    w = ridge_solve(x - x_mean, y - y.mean(dim=0), lambda_, method)
    b = y.mean(dim=0) - x_mean @ w
    return torch.cat([w, b[None]], dim=0)


def _ridge_with_ones(x: Tensor, y: Tensor, lambda_: float, method: str) -> Tensor:
    """``ridge_solve([x, 1], y)`` without building ``[x, 1]`` (a second copy of the N x D
    float64 rows, the largest thing the box-regression fit holds): the ones column enters the
    dual kernel as ``+ 1`` and the primal system as one extra row and column."""
    _check(x, y, lambda_, method)
    x = x.double()
    y = y.to(device=x.device, dtype=torch.float64)
    n, d = x.shape
    if method == "auto":
        method = "dual" if n < d + 1 else "primal"
    if method == "dual":
        kernel = x @ x.T
        kernel.add_(1.0).diagonal().add_(lambda_)
        alpha = torch.cholesky_solve(y, torch.linalg.cholesky(kernel))
        return torch.cat([x.T @ alpha, alpha.sum(dim=0, keepdim=True)], dim=0)
    normal = NormalEquations(d, y.shape[1], device=x.device)
    normal.add(x, y)
    return normal.solve(lambda_, regularize_bias=True)


def ridge_memory(n: int, d: int, method: str) -> int:
    """Float64 values the box-regression ridge fit of ``n`` rows of ``d`` features holds at
    once: the dual keeps the rows and the N x N kernel, the primal (``NormalEquations``, rows
    streamed in chunks) only the (D + 1) x (D + 1) system."""
    return n * n + n * d if method == "dual" else (d + 1) * (d + 1)


class NormalEquations:
    """The primal ridge system with a bias, ``[x, 1]^T [x, 1]`` and ``[x, 1]^T y``, summed
    over chunks of rows, so that the rows are never held together (R-CNN's
    ``ridge_reg_chol`` builds the same system from all rows at once). Float64.

    Args:
        d: features per row. device: where the system lives.
    """

    def __init__(self, d: int, targets: int = 4, device: Any = "cpu") -> None:
        self.d, self.n = int(d), 0
        f64 = dict(dtype=torch.float64, device=device)
        self.gram = torch.zeros(d + 1, d + 1, **f64)  # last row / column: the ones feature
        self.rhs = torch.zeros(d + 1, targets, **f64)

    def add(self, x: Tensor, y: Tensor) -> None:
        """Rows ``x`` (Tensor[n, D]) with targets ``y`` (Tensor[n, T]), any float dtype."""
        x = x.to(self.gram)
        y = y.to(self.gram)
        d = self.d
        self.gram[:d, :d].addmm_(x.T, x)
        col = x.sum(dim=0)
        self.gram[:d, d] += col
        self.gram[d, :d] += col
        self.gram[d, d] += x.shape[0]
        self.rhs[:d].addmm_(x.T, y)
        self.rhs[d] += y.sum(dim=0)
        self.n += x.shape[0]

    def solve(self, lambda_: float, regularize_bias: bool = True) -> Tensor:
        """Tensor[D + 1, T]: the ridge weights, bias last. ``regularize_bias``: the bias is
        penalised like the other weights (R-CNN's constant-1 feature); else it is free (the
        solution on centred features, as ``ridge_solve_with_bias(..., False, ...)``).

        Consumes the system: the Cholesky factor overwrites it (LAPACK in place, so the
        (D + 1)^2 system is held once: 251 MB for 5,600 features).
        """
        if lambda_ <= 0:
            raise ValueError(f"ridge_solve: lambda_ must be positive, got {lambda_}")
        d = self.d
        if regularize_bias:
            gram, rhs = self.gram, self.rhs
        else:
            # Centred: (G - s s^T / n + lambda I) w = X^T y - s ybar^T, b = ybar - s^T w / n.
            n = max(self.n, 1)
            s, ybar = self.gram[:d, d].clone(), self.rhs[d] / n
            gram = self.gram[:d, :d]
            gram.addr_(s, s, alpha=-1.0 / n)
            rhs = self.rhs[:d] - torch.outer(s, ybar)
        gram.diagonal().add_(lambda_)
        w = _cholesky_solve_in_place(gram, rhs)
        if regularize_bias:
            return w
        return torch.cat([w, (ybar - (s / n) @ w)[None]], dim=0)


def _cholesky_solve_in_place(a: Tensor, b: Tensor) -> Tensor:
    """``a^-1 b`` for a symmetric positive definite float64 ``a`` on the CPU, factorised in
    place (``a`` is overwritten); ``torch.cholesky_solve`` elsewhere."""
    if a.device.type != "cpu":
        return torch.cholesky_solve(b, torch.linalg.cholesky(a))
    from scipy.linalg import cho_factor, cho_solve

    # a is symmetric, so its transpose (a Fortran-ordered view) is the same matrix, and
    # LAPACK can overwrite it without a copy. A view of a larger matrix is copied once.
    a_np = a.numpy().T
    factor = cho_factor(a_np, lower=True, overwrite_a=True, check_finite=False)
    return torch.from_numpy(cho_solve(factor, b.numpy(), check_finite=False))
