"""Triton implementation of ``rosafx::lowrank_linear``: y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ.

The op (schema, fake, gradient math, autograd wiring) is declared once in
rosafx/ops/lowrank.py; this file plugs its Triton launchers into it as
``rosafx::lowrank_linear_triton``. The base product x·Wᵀ + b stays a cuBLAS call (torch);
the adapter adds two Triton products: h = x_a·Aᵀ (N x r, a temporary: the backward
recomputes it, as the torch implementation does) and the in-place epilogue
y += scale·h·Bᵀ, which writes into the base output, so no N x out temporary exists.
``x_a`` (the adapter's own input, dropout(x)) defaults to ``x``.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from rosafx.ops.lowrank import lowrank_linear as LOWRANK_LINEAR
from rosafx.ops.spec import rows

from rosafx.kernels.matmul import compile_visible, matmul


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
                    x_a: Optional[Tensor] = None) -> Tensor:
    _check(x, weight, A, B, x_a)
    y = F.linear(x, weight, bias).contiguous()
    h = matmul(rows(x if x_a is None else x_a), A.t(), out_dtype=A.dtype)
    matmul(h, B.t(), alpha=scale, out=rows(y), accumulate=True)      # y += scale·h·Bᵀ in place
    return y


def lowrank_backward(dy: Tensor, needs: tuple[bool, ...], x: Tensor, weight: Tensor, bias: Optional[Tensor],
                     A: Tensor, B: Tensor, scale: float, x_a: Optional[Tensor] = None):
    """The spec's gradients (rosafx/ops/lowrank.py) with Triton adapter products:
    (dx, dW, db, dA, dB, None, dx_a) for ``needs`` over the op's seven arguments."""
    need_x, need_w, need_b, need_a, need_bmat, _, need_xa = needs
    need_xa = need_xa and x_a is not None
    dy2 = rows(dy).contiguous()
    adapter_in = rows(x if x_a is None else x_a)
    h = matmul(adapter_in, A.t(), out_dtype=A.dtype) if need_bmat else None
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
        dW = (dy2.t() @ rows(x).to(dy2.dtype)).to(weight.dtype)
    if need_b and bias is not None:
        db = dy2.sum(0)
    if need_a:
        dA = matmul(g.t(), adapter_in, out_dtype=A.dtype)
    if need_bmat:
        dB = matmul(dy2.t(), h, alpha=scale, out_dtype=B.dtype)
    return dx, dW, db, dA, dB, None, dx_a


# on a GPU torch.compile sees the kernels (triton_op); under the interpreter the op stays opaque
lowrank_linear_triton = (LOWRANK_LINEAR.implement_visible("triton", lowrank_forward, lowrank_backward)
                         if compile_visible() else
                         LOWRANK_LINEAR.implement("triton", lowrank_forward, lowrank_backward, opaque_backward=True))


def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                   scale: float) -> Tensor:
    """y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ through ``rosafx::lowrank_linear_triton``."""
    return lowrank_linear_triton(x, weight, bias, A, B, scale, None)
