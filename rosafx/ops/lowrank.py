"""``rosafx::lowrank_linear``: y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ.

Used by lora, lora-ga and rosa. ``x_a`` is the adapter's input (dropout(x)); when it is
None the adapter reads ``x`` itself. The low-rank path runs in the adapter's dtype (fp32
by default) and is cast back to the base output's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def lowrank_delta(x_a: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Return (h, delta) with h = x_a·Aᵀ and delta = scale·h·Bᵀ, in the adapter's dtype."""
    h = x_a.to(A.dtype) @ A.t()
    return h, (h @ B.t()) * scale


@torch.library.custom_op("rosafx::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                   scale: float, x_a: Optional[Tensor] = None) -> Tensor:
    y = F.linear(x, weight, bias)
    _, delta = lowrank_delta(x if x_a is None else x_a, A, B, scale)
    return y + delta.to(y.dtype)


@lowrank_linear.register_fake
def _(x, weight, bias, A, B, scale, x_a=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, A, B, scale, x_a = inputs
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.separate_adapter_input = x_a is not None
    ctx.save_for_backward(x, weight, A, B, x_a)


def _backward(ctx, dy):
    """Gradients, with h = x_a·Aᵀ and g = scale·dy·B (both (…, r)):

        dx   = dy·W (+ g·A when the adapter reads x itself)
        dx_a = g·A                       (when the adapter has its own input)
        dB   = scale·dyᵀ·h               (out x r, summed over all leading dims)
        dA   = gᵀ·x_a                    (r x in)
        dW   = dyᵀ·x,  db = Σ dy         (only when asked: calibration hooks on W)
    """
    x, weight, A, B, x_a = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * (7 - len(ctx.needs_input_grad))
    adapter_in = x if x_a is None else x_a
    dy2 = dy.reshape(-1, dy.shape[-1])
    a2 = adapter_in.reshape(-1, adapter_in.shape[-1]).to(A.dtype)
    dyA = dy2.to(A.dtype)
    g = (dyA @ B) * ctx.scale                          # (N, r)
    dx = dW = db = dA = dB = dx_a = None
    if needs[0] or needs[6]:
        g_in = (g @ A).to(x.dtype)
        if needs[0]:
            dx = (dy2 @ weight.to(dy2.dtype)).to(x.dtype)
            if x_a is None:
                dx = dx + g_in
            dx = dx.reshape(x.shape)
        if needs[6]:
            dx_a = g_in.to(x_a.dtype).reshape(x_a.shape)
    if needs[1]:
        dW = (dy2.t() @ x.reshape(-1, x.shape[-1]).to(dy2.dtype)).to(weight.dtype)
    if needs[2] and ctx.has_bias:
        db = dy2.sum(0)
    if needs[4]:
        h = a2 @ A.t()
        dB = (dyA.t() @ h) * ctx.scale
    if needs[3]:
        dA = g.t() @ a2
    return (dx, dW, db, dA, dB, None, dx_a)[: len(ctx.needs_input_grad)]


lowrank_linear.register_autograd(_backward, setup_context=_setup)
