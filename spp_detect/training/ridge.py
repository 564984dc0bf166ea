"""Closed-form ridge regression in float64 (R-CNN's ``ridge_reg_chol``), for the box regressors."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ridge_solve", "ridge_solve_with_bias"]


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
    gram = x.new_empty(d + 1, d + 1)
    torch.matmul(x.T, x, out=gram[:d, :d])
    col = x.sum(dim=0)
    gram[:d, d], gram[d, :d], gram[d, d] = col, col, float(n)
    gram.diagonal().add_(lambda_)
    rhs = torch.cat([x.T @ y, y.sum(dim=0, keepdim=True)], dim=0)
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram))
