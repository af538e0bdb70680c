"""``rosafx::lowrank_linear``: y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ (lora, lora-ga, rosa).

The spec (schema, fake, gradients) is declared once below; this file also holds the torch
implementation, the reference on any device. The Triton one is kernels/lowrank_linear.py.
The low-rank path runs in the adapter's dtype (fp32 by default) and is cast back to the base
output's dtype; the forward adds it into the base output in place (one addmm, no extra
N x out temporary).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .spec import op_spec, rows


@op_spec
def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                   scale: float, x_a: Optional[Tensor] = None) -> Tensor:
    """y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ; ``x_a`` is the adapter's input (dropout(x)), None
    means x itself.

    Gradients, every leading dim flattened to N rows, h = x_a·Aᵀ and g = scale·dy·B (both
    N x r):

        dx   = dy·W (+ g·A when the adapter reads x itself: ∂(h·Bᵀ)/∂x through h)
        dx_a = g·A                       (when the adapter has its own input)
        dA   = gᵀ·x_a                    since ∂L/∂h = scale·dy·B = g and h = x_a·Aᵀ
        dB   = scale·dyᵀ·h               (out x r)
        dW   = dyᵀ·x,  db = Σ dy         (only when asked: calibration hooks on W)

    h is recomputed in the backward (N·in·r flops, a few percent of the base matmul) rather
    than saved, since an extra saved tensor per site costs activation memory every step.
    """


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
            x_a: Optional[Tensor] = None) -> Tensor:
    y = F.linear(x, weight, bias)
    h = rows(x if x_a is None else x_a).to(A.dtype) @ A.t()           # (N, r)
    y2 = rows(y)
    if y.dtype == B.dtype and y2.data_ptr() == y.data_ptr() and y.is_contiguous():
        y2.addmm_(h, B.t(), alpha=scale)                               # y += scale·h·Bᵀ, in place
    else:
        y = (y2 + (scale * (h @ B.t())).to(y.dtype)).reshape(y.shape)
    return y


def backward(dy, needs, x, weight, bias, A, B, scale, x_a=None):
    """The spec's gradients (``lowrank_linear.doc``) in torch."""
    adapter_in = rows(x if x_a is None else x_a).to(A.dtype)
    dy2 = rows(dy)
    dyA = dy2.to(A.dtype)
    # skinny products are written with the long N dimension inner to both operands: MKL ran
    # dy·B and dyᵀ·h 5-30x slower than the same products as (Bᵀ·dyᵀ)ᵀ and (hᵀ·dy)ᵀ on CPU
    g = (B.t() @ dyA.t()).t().mul_(scale)                              # (N, r)
    dx = dW = db = dA = dB = dx_a = None
    if needs[0]:
        dx = dy2 @ weight.to(dy2.dtype)
        if x_a is None:
            if dx.dtype == A.dtype:
                dx.addmm_(g, A)
            else:
                dx = dx + (g @ A).to(dx.dtype)
        dx = dx.reshape(x.shape)
    if needs[6]:
        dx_a = (g @ A).to(x_a.dtype).reshape(x_a.shape)
    if needs[1]:
        dW = (dy2.t() @ rows(x).to(dy2.dtype)).to(weight.dtype)
    if needs[2] and bias is not None:
        db = dy2.sum(0)
    if needs[4]:
        dB = ((adapter_in @ A.t()).mul_(scale).t() @ dyA).t()
    if needs[3]:
        dA = g.t() @ adapter_in
    return dx, dW, db, dA, dB, None, dx_a


lowrank_linear.implement("torch", forward, backward)
