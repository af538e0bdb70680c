"""Triton implementation of ``rosafx::vera_linear``: y = x·Wᵀ + bias + b ⊙ ((d ⊙ (x_a·Aᵀ))·Bᵀ).

The op (schema, fake, gradient math, autograd wiring) is declared once in rosafx/ops/vera.py;
this file plugs its launchers into it as ``rosafx::vera_linear_triton``.

A (r x in) and B (out x r) are frozen random matrices shared by every site; a site reads
the slices A_shared[:, :in] and B_shared[:out, :] (strided views, no copies). d (r) and
b (out) are the trained scaling vectors. The base product stays torch; the adapter is two
strided Triton products, the second with b as a per-column epilogue, added in place into
the base output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rosafx.ops.spec import rows
from rosafx.ops.vera import vera_linear as VERA_LINEAR

from rosafx.kernels.matmul import compile_visible, matmul


def site_slices(weight: Tensor, A_shared: Tensor, B_shared: Tensor, d: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    out_f, in_f = weight.shape
    if A_shared.dim() != 2 or B_shared.dim() != 2 or A_shared.shape[1] < in_f or B_shared.shape[0] < out_f \
            or A_shared.shape[0] != B_shared.shape[1] or d.shape != (A_shared.shape[0],) or b.shape != (out_f,):
        raise ValueError(f"vera_linear: A {tuple(A_shared.shape)}, B {tuple(B_shared.shape)}, d {tuple(d.shape)}, "
                         f"b {tuple(b.shape)} do not fit weight {tuple(weight.shape)}: need A (r x >={in_f}), "
                         f"B (>={out_f} x r), d (r), b ({out_f})")
    return A_shared[:, :in_f], B_shared[:out_f, :]


def vera_forward(x, weight, bias, A_shared, B_shared, d, b, x_a=None) -> Tensor:
    A, B = site_slices(weight, A_shared, B_shared, d, b)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"vera_linear: x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    y = F.linear(x, weight, bias).contiguous()
    hd = matmul(rows(x if x_a is None else x_a), A.t(), out_dtype=d.dtype).mul_(d)     # d ⊙ (x_a·Aᵀ), N x r
    matmul(hd, B.t(), out=rows(y), accumulate=True, col_scale=b)                       # y += b ⊙ (hd·Bᵀ)
    return y


def vera_backward(dy, needs, x, weight, bias, A_shared, B_shared, d, b, x_a=None):
    """The spec's gradients (rosafx/ops/vera.py) with Triton products: (dx, dW, dbias,
    dA_shared, dB_shared, dd, db, dx_a) for ``needs`` over the op's eight arguments.

    With N rows, h = x_a·Aᵀ (N x r), u = (h ⊙ d)·Bᵀ (N x out), y = … + b ⊙ u. Since
    (dy ⊙ b)·B = dy·(b ⊙_rows B), no N x out temporary is needed: g = dy·B_b with
    B_b = diag(b)·B (out x r, small). Then ∂L/∂h = g ⊙ d and

        dd    = Σ_n h ⊙ g                       (r)
        db    = Σ_k B ⊙ (dyᵀ·(h ⊙ d))           (out): db[o] = Σ_n dy[n,o]·u[n,o]
        dx    = dy·W (+ (g ⊙ d)·A when the adapter reads x),   dx_a = (g ⊙ d)·A
        dA    = (g ⊙ d)ᵀ·x_a,   dB = diag(b)·dyᵀ·(h ⊙ d)   (into the used slice; frozen in VeRA)
        dW    = dyᵀ·x,  dbias = Σ_n dy          (torch; only when asked)
    """
    need_x, need_w, need_bias, need_as, need_bs, need_d, need_b, need_xa = needs
    need_bias, need_xa = need_bias and bias is not None, need_xa and x_a is not None
    A, B = site_slices(weight, A_shared, B_shared, d, b)
    dy2 = rows(dy).contiguous()
    adapter_in = rows(x if x_a is None else x_a)
    h = matmul(adapter_in, A.t(), out_dtype=d.dtype)
    g = matmul(dy2, B * b[:, None], out_dtype=d.dtype)             # (dy ⊙ b)·B
    gd = g * d
    dx = dW = dbias = dA = dB = dd = db = dx_a = None
    if need_x:
        dx = dy2 @ weight.to(dy2.dtype)
        if x_a is None:
            matmul(gd, A, out=dx, accumulate=True)
        dx = dx.reshape(x.shape)
    if need_xa:
        dx_a = matmul(gd, A, out_dtype=x_a.dtype).reshape(x_a.shape)
    if need_w:
        dW = (dy2.t() @ rows(x).to(dy2.dtype)).to(weight.dtype)
    if need_bias:
        dbias = dy2.sum(0)
    if need_d:
        dd = (h * g).sum(0)
    if need_b or need_bs:
        dy_t_hd = matmul(dy2.t(), h * d, out_dtype=d.dtype)        # out x r
        if need_b:
            db = (B * dy_t_hd).sum(1).to(b.dtype)
        if need_bs:
            dB = torch.zeros_like(B_shared)
            dB[: B.shape[0]] = dy_t_hd * b[:, None]
    if need_as:
        dA = torch.zeros_like(A_shared)
        dA[:, : A.shape[1]] = matmul(gd.t(), adapter_in, out_dtype=A.dtype)
    return dx, dW, dbias, dA, dB, dd, db, dx_a


# on a GPU torch.compile sees the kernels (triton_op); under the interpreter the op stays opaque
vera_linear_triton = (VERA_LINEAR.implement_visible("triton", vera_forward, vera_backward) if compile_visible() else
                      VERA_LINEAR.implement("triton", vera_forward, vera_backward, opaque_backward=True))


def vera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, d: Tensor,
                b: Tensor) -> Tensor:
    """y = x·Wᵀ + bias + b ⊙ ((d ⊙ (x·Aᵀ))·Bᵀ) with A, B sliced to the weight's shape, through
    ``rosafx::vera_linear_triton``."""
    return vera_linear_triton(x, weight, bias, A, B, d, b, None)
