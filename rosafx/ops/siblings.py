"""Ops for sibling fusion (passes/fuse_siblings.py): adapter sites that read the same input
share their down-projection. Torch implementations only (``lower`` leaves them on torch).

``rosafx::lowrank_down_stacked(x, As) -> [h_1, …]``: h_i = x·A_iᵀ for every A_i in one
matmul over the stacked A's (the A's stay separate Parameters; the stack is a Σr x in copy
per call). ``rosafx::lowrank_linear_given_h(x, W, b, B, scale, h)``: y = x·Wᵀ + b +
scale·h·Bᵀ, the site's half. ``rosafx::vera_project(x, A_shared, in_features)``: VeRA's
h = x·A_shared[:, :in]ᵀ, shared by sites with the same slice; no gradient flows through it
(``vera_linear_given_h``, in ops/vera.py, does not depend on h for its output).

``FUSIONS`` says, per adapter op, which of these ops its sibling sites are fused into.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rosafx.ops.spec import OpSpec, op_spec, rows
from rosafx.ops.vera import vera_linear_given_h


def _stacked_outputs_like(x, As):
    return [x.new_empty((*x.shape[:-1], A.shape[0]), dtype=A.dtype) for A in As]


def _cat(tensors: list[Tensor], dim: int = 0) -> Tensor:
    return torch.cat(tensors, dim) if len(tensors) > 1 else tensors[0]


@op_spec(fake=_stacked_outputs_like, roles={"input": "x", "down": "As"})
def lowrank_down_stacked(x: Tensor, As: list[Tensor]) -> list[Tensor]:
    """[h_1 … h_k] with h_i = x·A_iᵀ. With H = x·[A_1; …; A_k]ᵀ (N x Σr) and dH = [dh_1 … dh_k]:

        dx   = dH·[A_1; …; A_k]          one N x Σr x in matmul for all sites
        dA_i = dh_iᵀ·x                   one Σr x N x in matmul, split by rows
    """


def _down_forward(x, As):
    stacked = _cat(As)
    h = rows(x).to(stacked.dtype) @ stacked.t()                        # (N, Σr)
    lead = x.shape[:-1]
    return [part.reshape(*lead, part.shape[-1]).contiguous() for part in h.split([A.shape[0] for A in As], dim=1)]


def _down_backward(dhs, needs, x, As):
    stacked = _cat(As)
    dh = _cat([rows(g) if g is not None else rows(x).new_zeros(rows(x).shape[0], A.shape[0], dtype=A.dtype)
                    for g, A in zip(dhs, As)], dim=1).to(stacked.dtype)
    dx = dA = None
    if needs[0]:
        dx = (dh @ stacked).to(x.dtype).reshape(x.shape)
    if needs[1]:
        dA = list((dh.t() @ rows(x).to(stacked.dtype)).split([A.shape[0] for A in As], dim=0))
    return dx, dA


lowrank_down_stacked.implement("torch", _down_forward, _down_backward)


@op_spec(roles={"input": "x", "weight": "weight", "bias": "bias", "up": "B", "scale": "scale", "down_output": "h"})
def lowrank_linear_given_h(x: Tensor, weight: Tensor, bias: Optional[Tensor], B: Tensor, scale: float,
                           h: Tensor) -> Tensor:
    """y = x·Wᵀ + b + scale·h·Bᵀ with h (N x r) given:

        dx = dy·W               (the adapter's share of dx flows through h)
        dh = scale·dy·B,   dB = scale·dyᵀ·h
        dW = dyᵀ·x,  db = Σ dy  (only when asked: calibration hooks on W)
    """


def _given_h_forward(x, weight, bias, B, scale, h):
    y = F.linear(x, weight, bias)
    y2 = rows(y)
    if y.dtype == B.dtype and y.is_contiguous():
        y2.addmm_(rows(h), B.t(), alpha=scale)                          # y += scale·h·Bᵀ, in place
        return y
    return (y2 + (scale * (rows(h) @ B.t())).to(y.dtype)).reshape(y.shape)


def _given_h_backward(dy, needs, x, weight, bias, B, scale, h):
    dy2 = rows(dy)
    dyB = dy2.to(B.dtype)
    dx = dW = db = dB = dh = None
    if needs[0]:
        dx = (dy2 @ weight.to(dy2.dtype)).reshape(x.shape)
    if needs[1]:
        dW = (dy2.t() @ rows(x).to(dy2.dtype)).to(weight.dtype)
    if needs[2] and bias is not None:
        db = dy2.sum(0)
    if needs[3]:
        dB = (rows(h).to(B.dtype).t() @ dyB).t().mul_(scale)            # (hᵀ·dy)ᵀ: see ops/lowrank.py
    if needs[5]:
        dh = (B.t() @ dyB.t()).t().mul_(scale).to(h.dtype).reshape(h.shape)
    return dx, dW, db, dB, None, dh


lowrank_linear_given_h.implement("torch", _given_h_forward, _given_h_backward)


def _projection_like(x, A_shared, in_features):
    return x.new_empty((*x.shape[:-1], A_shared.shape[0]), dtype=A_shared.dtype)


@op_spec(fake=_projection_like, roles={"input": "x", "down": "A_shared", "in_features": "in_features"})
def vera_project(x: Tensor, A_shared: Tensor, in_features: int) -> Tensor:
    """h = x·A_shared[:, :in_features]ᵀ. h only feeds d's and b's gradients in
    vera_linear_given_h, so no gradient reaches x or A_shared through it."""


def _project_forward(x, A_shared, in_features):
    return (rows(x).to(A_shared.dtype) @ A_shared[:, :in_features].t()).reshape(*x.shape[:-1], A_shared.shape[0])


def _no_gradient(dh, needs, x, A_shared, in_features):
    return None, None, None


vera_project.implement("torch", _project_forward, _no_gradient)


@dataclass(frozen=True)
class SiblingFusion:
    """How the sites of one adapter op that read the same input share their down-projection."""
    down: OpSpec      # called once per group, gives h
    given_h: OpSpec   # each site's own op, its h given (role "down_output")
    stacked: bool     # True: one call over the sites' own downs (a list), one h per site;
                      # False: sites with the same down and in_features share one call and one h


# adapter op (spec name) -> its sibling fusion; passes/fuse_siblings.py reads only this table
FUSIONS = {
    "lowrank_linear": SiblingFusion(lowrank_down_stacked, lowrank_linear_given_h, stacked=True),
    "vera_linear": SiblingFusion(vera_project, vera_linear_given_h, stacked=False),
}
