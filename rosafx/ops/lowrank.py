"""``rosafx::lowrank_linear``: y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ (lora, lora-ga, rosa).

The spec (schema, fake, gradients) is declared once below; this file also holds the torch
implementation, the reference on any device. The Triton one is kernels/lowrank_linear.py.

How the torch implementation runs, and why: the adapter's products are skinny (rank r
against thousands of rows), so on CPU they cost what it takes to stream their N-row
operand, not their flops. When the adapter reads x itself, the weights share a dtype and
the weight is small against the activations (``_merge_pays``), the forward and dx run
through a transient merged weight W + scale·B·A (out·in·r flops, independent of N): one
dense matmul each, as in the frozen model, and the only N-row adapter work left is the
backward's h, g, dA and dB. Otherwise the low-rank path runs in the adapter's dtype (fp32 by
default), is cast back to the base output's dtype and is added into the base output in place
(one addmm, no extra N x out temporary).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rosafx.ops.spec import kept_for_backward, op_spec, rows


@op_spec
def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                   scale: float, x_a: Optional[Tensor] = None) -> Tensor:
    """y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ; ``x_a`` is the adapter's input (dropout(x)), None
    means x itself.

    Gradients, every leading dim flattened to N rows, h = x_a·Aᵀ and g = scale·dy·B (both
    N x r):

        dx   = dy·W (+ g·A when the adapter reads x itself: ∂(h·Bᵀ)/∂x through h)
             = dy·(W + scale·B·A)         (the same, through the merged weight)
        dx_a = g·A                       (when the adapter has its own input)
        dA   = gᵀ·x_a                    since ∂L/∂h = scale·dy·B = g and h = x_a·Aᵀ
        dB   = scale·dyᵀ·h               (out x r)
        dW   = dyᵀ·x,  db = Σ dy         (only when asked: calibration hooks on W)

    h is recomputed in the backward (N·in·r flops, a few percent of the base matmul) rather
    than saved, since an extra saved tensor per site costs activation memory every step. The
    merged weight, when the forward built one no larger than x, is saved (``forward_saving``).
    """


def _merge_pays(x: Tensor, weight: Tensor, A: Tensor, B: Tensor, x_a: Optional[Tensor]) -> bool:
    """Whether forward and dx should run through W + scale·B·A: only when the adapter reads x
    itself and everything is in one dtype (a merged bf16 weight would round the update away),
    and the weight's two extra passes (out·in, read and written) cost less than the N-row
    passes the merge saves (h in the forward, y += h·Bᵀ and dx += g·A: N·(in + out) and more)."""
    if x_a is not None or not (x.dtype == weight.dtype == A.dtype == B.dtype):
        return False
    out_f, in_f = weight.shape
    return out_f * in_f <= x.numel() // in_f * (in_f + out_f)


def _merged_weight(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """W + scale·B·A, a new out x in tensor."""
    return torch.addmm(weight, B, A, alpha=scale)


def _down(adapter_in: Tensor, A: Tensor) -> Tensor:
    """hᵀ = A·x_aᵀ (r x N, contiguous). MKL ran x·Aᵀ 1.4-2x slower than A·xᵀ on CPU (the
    long N dimension inner to both operands); h itself is hᵀ.t()."""
    return A @ adapter_in.t()


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
            x_a: Optional[Tensor] = None) -> Tensor:
    if _merge_pays(x, weight, A, B, x_a):
        return F.linear(x, _merged_weight(weight, A, B, scale), bias)
    y = F.linear(x, weight, bias)
    h = _down(rows(x if x_a is None else x_a).to(A.dtype), A).t()    # (N, r)
    y2 = rows(y)
    if y.dtype == B.dtype and y2.data_ptr() == y.data_ptr() and y.is_contiguous():
        y2.addmm_(h, B.t(), alpha=scale)                               # y += scale·h·Bᵀ, in place
    else:
        y = (y2 + (scale * (h @ B.t())).to(y.dtype)).reshape(y.shape)
    return y


def forward_saving(x, weight, bias, A, B, scale, x_a=None) -> tuple[Tensor, tuple]:
    """forward, and the merged weight for the backward (spec.py's opt-in, ``kept_for_backward``):
    one weight copy and out·in·r product less per site and step (about 1 % of a MiniLM step,
    docs/performance.md)."""
    if not _merge_pays(x, weight, A, B, x_a):
        return forward(x, weight, bias, A, B, scale, x_a), ()
    merged = _merged_weight(weight, A, B, scale)
    return F.linear(x, merged, bias), kept_for_backward(merged, x)


def backward(dy, needs, x, weight, bias, A, B, scale, x_a=None, saved=None):
    """The spec's gradients (``lowrank_linear.doc``) in torch; ``saved``: the forward's merged
    weight, or nothing (then it is built again)."""
    merged = _merge_pays(x, weight, A, B, x_a)
    adapter_in = rows(x if x_a is None else x_a).to(A.dtype)
    dy2 = rows(dy)
    dyA = dy2.to(A.dtype)
    # skinny products are written with the long N dimension inner to both operands: MKL ran
    # dy·B and dyᵀ·h 5-30x slower than the same products as (Bᵀ·dyᵀ)ᵀ and (hᵀ·dy)ᵀ on CPU
    g = None
    if needs[3] or needs[6] or (needs[0] and not merged):
        g = (B.t() @ dyA.t()).t().mul_(scale)                          # (N, r)
    dx = dW = db = dA = dB = dx_a = None
    if needs[0]:
        if merged:
            merged_weight = saved[0] if saved else _merged_weight(weight, A, B, scale)
            dx = dy2 @ merged_weight.to(dy2.dtype)                         # dy is bf16 under autocast
        else:
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
        dB = (_down(adapter_in, A) @ dyA).mul_(scale).t()                 # (hᵀ·dy)ᵀ·scale
    if needs[3]:
        dA = g.t() @ adapter_in
    return dx, dW, db, dA, dB, None, dx_a


lowrank_linear.implement("torch", forward, backward, forward_saving=forward_saving)
