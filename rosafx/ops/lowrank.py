"""``rosafx::lowrank_linear``: y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ.

Used by lora, lora-ga and rosa. ``x_a`` is the adapter's input (dropout(x)); when it is
None the adapter reads ``x`` itself. The low-rank path runs in the adapter's dtype (fp32
by default) and is cast back to the base output's dtype. The forward adds the low-rank
term into the base output in place (one addmm, no extra N x out temporary).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
             x_a: Optional[Tensor]) -> Tensor:
    y = F.linear(x, weight, bias)
    h = _rows(x if x_a is None else x_a).to(A.dtype) @ A.t()          # (N, r)
    y2 = _rows(y)
    if y.dtype == B.dtype and y2.data_ptr() == y.data_ptr() and y.is_contiguous():
        y2.addmm_(h, B.t(), alpha=scale)                               # y += scale·h·Bᵀ, in place
    else:
        y = (y2 + (scale * (h @ B.t())).to(y.dtype)).reshape(y.shape)
    return y


@torch.library.custom_op("rosafx::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                   scale: float, x_a: Optional[Tensor] = None) -> Tensor:
    return _forward(x, weight, bias, A, B, scale, x_a)


@lowrank_linear.register_fake
def _(x, weight, bias, A, B, scale, x_a=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, A, B, scale, x_a = (tuple(inputs) + (None,))[:7]
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, A, B, x_a)


def _backward(ctx, dy):
    """Gradients, with every leading dim flattened to N rows, h = x_a·Aᵀ and g = scale·dy·B
    (both N x r):

        dx   = dy·W (+ g·A when the adapter reads x itself)
        dx_a = g·A                       (when the adapter has its own input)
        dB   = scale·dyᵀ·h               (out x r)
        dA   = gᵀ·x_a                    (r x in)
        dW   = dyᵀ·x,  db = Σ dy         (only when asked: calibration hooks on W)

    h is recomputed (N·in·r flops, a few percent of the base matmul) rather than saved,
    since an extra saved tensor per site costs activation memory for every step.
    """
    x, weight, A, B, x_a = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * (7 - len(ctx.needs_input_grad))
    adapter_in = _rows(x if x_a is None else x_a).to(A.dtype)
    dy2 = _rows(dy)
    dyA = dy2.to(A.dtype)
    # skinny products are written with the long N dimension inner to both operands: MKL ran
    # dy·B and dyᵀ·h 5-30x slower than the same products as (Bᵀ·dyᵀ)ᵀ and (hᵀ·dy)ᵀ on CPU
    g = (B.t() @ dyA.t()).t().mul_(ctx.scale)                           # (N, r)
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
        dW = (dy2.t() @ _rows(x).to(dy2.dtype)).to(weight.dtype)
    if needs[2] and ctx.has_bias:
        db = dy2.sum(0)
    if needs[4]:
        dB = ((adapter_in @ A.t()).mul_(ctx.scale).t() @ dyA).t()
    if needs[3]:
        dA = g.t() @ adapter_in
    return (dx, dW, db, dA, dB, None, dx_a)[: len(ctx.needs_input_grad)]


lowrank_linear.register_autograd(_backward, setup_context=_setup)
