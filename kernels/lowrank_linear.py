"""Triton low-rank linear: y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ.

The base product x·Wᵀ + b stays a cuBLAS call (torch); the adapter adds two Triton
products: h = x_a·Aᵀ (N x r, kept for the backward) and the in-place epilogue
y += scale·h·Bᵀ, which writes into the base output, so no N x out temporary exists.
``x_a`` (the adapter's own input, dropout(x)) defaults to ``x``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .matmul import matmul


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _check(x: Tensor, weight: Tensor, A: Tensor, B: Tensor, x_a: Optional[Tensor]) -> None:
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"lowrank_linear: x has {x.shape[-1]} features, weight expects {in_f}")
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
        raise ValueError(f"lowrank_linear: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit weight "
                         f"{tuple(weight.shape)}: need A (r x {in_f}), B ({out_f} x r)")
    if x_a is not None and x_a.shape != x.shape:
        raise ValueError(f"lowrank_linear: x_a {tuple(x_a.shape)} differs from x {tuple(x.shape)}")


def lowrank_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                    x_a: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Returns (y, h) with h = x_a·Aᵀ (N x r, in A's dtype)."""
    _check(x, weight, A, B, x_a)
    y = F.linear(x, weight, bias).contiguous()
    h = matmul(_rows(x if x_a is None else x_a), A.t(), out_dtype=A.dtype)
    matmul(h, B.t(), alpha=scale, out=_rows(y), accumulate=True)     # y += scale·h·Bᵀ in place
    return y, h


def lowrank_backward(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: float,
                     x_a: Optional[Tensor], h: Optional[Tensor], needs: tuple[bool, ...]):
    """Gradients (dx, dW, db, dA, dB, dx_a) for needs = which of (x, W, b, A, B, x_a) want one.

    With every leading dim flattened to N rows, h = x_a·Aᵀ and g = scale·dy·B (N x r):

        y    = x·Wᵀ + b + scale·h·Bᵀ
        dx   = dy·W  (+ g·A when the adapter reads x itself: ∂(h·Bᵀ)/∂x through h)
        dx_a = g·A
        dA   = gᵀ·x_a                 since ∂L/∂h = scale·dy·B = g and h = x_a·Aᵀ
        dB   = scale·dyᵀ·h            (out x r)
        dW   = dyᵀ·x,  db = Σ_n dy     (torch; only when asked, e.g. calibration)
    """
    need_x, need_w, need_b, need_a, need_bmat, need_xa = needs
    dy2 = _rows(dy).contiguous()
    adapter_in = _rows(x if x_a is None else x_a)
    if h is None and need_bmat:
        h = matmul(adapter_in, A.t(), out_dtype=A.dtype)
    g = matmul(dy2, B, alpha=scale, out_dtype=A.dtype) if (need_x or need_a or need_xa) else None
    dx = dW = db = dA = dB = dx_a = None
    if need_x:
        dx = dy2 @ weight.to(dy2.dtype)
        if x_a is None:
            matmul(g, A, out=dx, accumulate=True)
        dx = dx.reshape(x.shape)
    if need_xa:
        dx_a = matmul(g, A, out_dtype=x_a.dtype).reshape(x_a.shape)
    if need_w:
        dW = (dy2.t() @ _rows(x).to(dy2.dtype)).to(weight.dtype)
    if need_b:
        db = dy2.sum(0)
    if need_a:
        dA = matmul(g.t(), adapter_in, out_dtype=A.dtype)
    if need_bmat:
        dB = matmul(dy2.t(), h, alpha=scale, out_dtype=B.dtype)
    return dx, dW, db, dA, dB, dx_a


class LowRankLinear(torch.autograd.Function):
    """Autograd over the launchers above; W and bias are frozen inputs (gradient math in
    ``lowrank_backward``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        y, h = lowrank_forward(x, weight, bias, A, B, scale)
        ctx.scale = scale
        ctx.save_for_backward(x, weight, A, B, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, h = ctx.saved_tensors
        n = ctx.needs_input_grad
        dx, _, _, dA, dB, _ = lowrank_backward(dy, x, weight, A, B, ctx.scale, None, h,
                                               (n[0], False, False, n[3], n[4], False))
        return dx, None, None, dA, dB, None


def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                   scale: float) -> Tensor:
    """y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ with Triton adapter products; grads for x, A, B."""
    return LowRankLinear.apply(x, weight, bias, A, B, scale)
