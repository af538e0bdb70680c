"""``rosafx::vera_linear``: y = x·Wᵀ + bias + b ⊙ ((d ⊙ (x_a·A_slᵀ))·B_slᵀ).

A_shared (r x in_max) and B_shared (out_max x r) are the frozen random pair shared by
every VeRA site of a model; the op slices A_sl = A_shared[:, :in], B_sl = B_shared[:out, :]
itself, so the graph holds one get_attr per shared tensor and no per-site copy. d (r) and
b (out) are the trained vectors. ``x_a`` is the adapter's input (dropout(x)); None means x.
The adapter path runs in d's dtype and is cast back to the base output's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _slices(weight: Tensor, A_shared: Tensor, B_shared: Tensor) -> tuple[Tensor, Tensor]:
    out_f, in_f = weight.shape
    if A_shared.shape[1] < in_f or B_shared.shape[0] < out_f:
        raise ValueError(f"vera_linear: shared A {tuple(A_shared.shape)} / B {tuple(B_shared.shape)} are smaller "
                         f"than the site's weight {tuple(weight.shape)}")
    return A_shared[:, :in_f], B_shared[:out_f, :]


@torch.library.custom_op("rosafx::vera_linear", mutates_args=())
def vera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_shared: Tensor, B_shared: Tensor,
                d: Tensor, b: Tensor, x_a: Optional[Tensor] = None) -> Tensor:
    A, B = _slices(weight, A_shared, B_shared)
    y = F.linear(x, weight, bias)
    hd = (_rows(x if x_a is None else x_a).to(d.dtype) @ A.t().to(d.dtype)) * d          # (N, r)
    delta = (hd @ B.t().to(d.dtype)) * b                                                # (N, out)
    return (_rows(y) + delta.to(y.dtype)).reshape(y.shape)


@vera_linear.register_fake
def _(x, weight, bias, A_shared, B_shared, d, b, x_a=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, A_shared, B_shared, d, b, x_a = (tuple(inputs) + (None,))[:8]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, A_shared, B_shared, d, b, x_a)


def _backward(ctx, dy):
    """Gradients, every leading dim flattened to N rows, h = x_a·A_slᵀ (N x r),
    g = (dy ⊙ b)·B_sl (N x r):

        dd    = Σ_n h ⊙ g                           (r)
        db    = Σ_n dy ⊙ ((h ⊙ d)·B_slᵀ)            (out)
        dx    = dy·W (+ (g ⊙ d)·A_sl when the adapter reads x itself)
        dx_a  = (g ⊙ d)·A_sl                        (when the adapter has its own input)
        dW    = dyᵀ·x,  dbias = Σ_n dy              (only when asked: calibration hooks on W)

    A_shared and B_shared are frozen: no gradient. h is recomputed (N·in·r flops) rather
    than saved, to spare activation memory per site.
    """
    x, weight, A_shared, B_shared, d, b, x_a = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * (8 - len(ctx.needs_input_grad))
    A, B = _slices(weight, A_shared, B_shared)
    A, B = A.to(d.dtype), B.to(d.dtype)
    adapter_in = _rows(x if x_a is None else x_a).to(d.dtype)
    dy2 = _rows(dy)
    dyd = dy2.to(d.dtype)
    h = adapter_in @ A.t()                                             # (N, r)
    g = (dyd * b) @ B                                                  # (N, r)
    dx = dW = dbias = dd = db = dx_a = None
    if needs[0] or needs[7]:
        gA = (g * d) @ A                                               # (N, in)
    if needs[0]:
        dx = dy2 @ weight.to(dy2.dtype)
        if x_a is None:
            dx = dx + gA.to(dx.dtype)
        dx = dx.reshape(x.shape)
    if needs[7] and x_a is not None:
        dx_a = gA.to(x_a.dtype).reshape(x_a.shape)
    if needs[1]:
        dW = (dy2.t() @ _rows(x).to(dy2.dtype)).to(weight.dtype)
    if needs[2] and ctx.has_bias:
        dbias = dy2.sum(0)
    if needs[5]:
        dd = (h * g).sum(0)
    if needs[6]:
        db = (dyd * ((h * d) @ B.t())).sum(0)
    return (dx, dW, dbias, None, None, dd, db, dx_a)[: len(ctx.needs_input_grad)]


vera_linear.register_autograd(_backward, setup_context=_setup)
