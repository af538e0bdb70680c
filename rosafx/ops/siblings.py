"""Ops for sibling fusion (passes/fuse_siblings.py): adapter sites that read the same input
share their down-projection.

``rosafx::lowrank_down_stacked(x, As) -> [h_1, …]``: h_i = x·A_iᵀ for every A_i in one
matmul over the stacked A's (the A's stay separate Parameters; the stack is a Σr x in copy
per call). ``rosafx::lowrank_linear_given_h(x, W, b, B, scale, h)``: y = x·Wᵀ + b +
scale·h·Bᵀ, the site's half. ``rosafx::vera_project(x, A_shared, in_features)``: VeRA's
h = x·A_shared[:, :in]ᵀ, shared by sites with the same slice; no gradient flows through it
(``vera_linear_given_h`` does not depend on h for its output).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


# --- rosafx::lowrank_down_stacked ---------------------------------------------------------

@torch.library.custom_op("rosafx::lowrank_down_stacked", mutates_args=())
def lowrank_down_stacked(x: Tensor, As: list[Tensor]) -> list[Tensor]:
    stacked = torch.cat(As) if len(As) > 1 else As[0]
    h = _rows(x).to(stacked.dtype) @ stacked.t()                        # (N, Σr)
    lead = x.shape[:-1]
    return [part.reshape(*lead, part.shape[-1]).contiguous() for part in h.split([A.shape[0] for A in As], dim=1)]


@lowrank_down_stacked.register_fake
def _(x, As):
    return [x.new_empty((*x.shape[:-1], A.shape[0]), dtype=A.dtype) for A in As]


def _down_setup(ctx, inputs, output):
    x, As = inputs
    ctx.save_for_backward(x, *As)


def _down_backward(ctx, dhs):
    """With H = [h_1 … h_k] = x·[A_1; …; A_k]ᵀ (N x Σr) and dH = [dh_1 … dh_k]:

        dx   = dH·[A_1; …; A_k]          one N x Σr x in matmul for all sites
        dA_i = dh_iᵀ·x                   one Σr x N x in matmul, split by rows
    """
    x, *As = ctx.saved_tensors
    stacked = torch.cat(As) if len(As) > 1 else As[0]
    dh = torch.cat([_rows(g) if g is not None else _rows(x).new_zeros(_rows(x).shape[0], A.shape[0], dtype=A.dtype)
                    for g, A in zip(dhs, As)], dim=1).to(stacked.dtype)
    dx = dA = None
    if ctx.needs_input_grad[0]:
        dx = (dh @ stacked).to(x.dtype).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        dA = list((dh.t() @ _rows(x).to(stacked.dtype)).split([A.shape[0] for A in As], dim=0))
    return dx, dA


lowrank_down_stacked.register_autograd(_down_backward, setup_context=_down_setup)


# --- rosafx::lowrank_linear_given_h -------------------------------------------------------

@torch.library.custom_op("rosafx::lowrank_linear_given_h", mutates_args=())
def lowrank_linear_given_h(x: Tensor, weight: Tensor, bias: Optional[Tensor], B: Tensor, scale: float,
                           h: Tensor) -> Tensor:
    y = F.linear(x, weight, bias)
    y2 = _rows(y)
    if y.dtype == B.dtype and y.is_contiguous():
        y2.addmm_(_rows(h), B.t(), alpha=scale)                          # y += scale·h·Bᵀ, in place
        return y
    return (y2 + (scale * (_rows(h) @ B.t())).to(y.dtype)).reshape(y.shape)


@lowrank_linear_given_h.register_fake
def _(x, weight, bias, B, scale, h):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _given_h_setup(ctx, inputs, output):
    x, weight, bias, B, scale, h = inputs
    ctx.scale, ctx.has_bias = scale, bias is not None
    ctx.save_for_backward(x, weight, B, h)


def _given_h_backward(ctx, dy):
    """N rows, h given (N x r):

        dx = dy·W               (the adapter's share of dx flows through h)
        dh = scale·dy·B,   dB = scale·dyᵀ·h
        dW = dyᵀ·x,  db = Σ dy  (only when asked: calibration hooks on W)
    """
    x, weight, B, h = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dy2 = _rows(dy)
    dyB = dy2.to(B.dtype)
    dx = dW = db = dB = dh = None
    if needs[0]:
        dx = (dy2 @ weight.to(dy2.dtype)).reshape(x.shape)
    if needs[1]:
        dW = (dy2.t() @ _rows(x).to(dy2.dtype)).to(weight.dtype)
    if needs[2] and ctx.has_bias:
        db = dy2.sum(0)
    if needs[3]:
        dB = (_rows(h).to(B.dtype).t() @ dyB).t().mul_(ctx.scale)       # (hᵀ·dy)ᵀ: see ops/lowrank.py
    if needs[5]:
        dh = (B.t() @ dyB.t()).t().mul_(ctx.scale).to(h.dtype).reshape(h.shape)
    return dx, dW, db, dB, None, dh


lowrank_linear_given_h.register_autograd(_given_h_backward, setup_context=_given_h_setup)


# --- rosafx::vera_project -----------------------------------------------------------------

@torch.library.custom_op("rosafx::vera_project", mutates_args=())
def vera_project(x: Tensor, A_shared: Tensor, in_features: int) -> Tensor:
    return (_rows(x).to(A_shared.dtype) @ A_shared[:, :in_features].t()).reshape(*x.shape[:-1], A_shared.shape[0])


@vera_project.register_fake
def _(x, A_shared, in_features):
    return x.new_empty((*x.shape[:-1], A_shared.shape[0]), dtype=A_shared.dtype)


def _no_gradient(ctx, dh):
    """h only feeds d's and b's gradients in vera_linear_given_h; no gradient reaches it."""
    return None, None, None


vera_project.register_autograd(_no_gradient, setup_context=lambda ctx, inputs, output: None)
