"""``rosafx::lowrank_linear``: y = x·Wᵀ + b + scale·(x_a·Aᵀ)·Bᵀ (lora, lora-ga, rosa).

The spec (schema, fake, gradients) is declared once below; this file also holds the torch
implementation, the reference on any device. The Triton one is kernels/lowrank_linear.py.

The torch implementation is a router (``choose_route``, issue 22): a small site (its dense
product N·in·out at most ``COMPOSITE_MACS``) runs as plain aten ops that autograd
differentiates in C++ (``composite_merged``: x·(W + scale·B·A)ᵀ + b; ``composite_unmerged``
when the adapter has its own input or dtypes differ), because there the Python around an
autograd.Function and its backward costs more than the arithmetic; a larger site runs the
custom op ``rosafx::lowrank_linear_opaque`` below. The graph holds ``rosafx::lowrank_linear``
either way (one node per site).

How the opaque op runs, and why: the adapter's products are skinny (rank r
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

from rosafx.ops.spec import implement_routed, kept_for_backward, op_spec, rows


@op_spec(roles={"input": "x", "weight": "weight", "bias": "bias", "down": "A", "up": "B", "scale": "scale",
                "adapter_input": "x_a"})
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


# ---------------------------------------------------------------- routes (issue 22)
# A site whose products are small costs what the Python around it costs: the opaque op's
# autograd.Function, its setup_context and its Python backward, per site and step. There the
# same math in plain aten ops, which autograd differentiates in C++, is cheaper; where the
# products are large, the opaque op's merged weight and skinny-product layouts pay.
COMPOSITE_MACS = 1 << 22
"""The largest N·in·out (the site's dense product, multiply-adds) run as aten ops. The merged
composite's backward forms dW' = dyᵀ·x, one such product more than the frozen site; 4.2 M
multiply-adds is 0.1–0.2 ms of one core here, about what the opaque op's Python costs per site
and step. Timed per site (forward + backward over the frozen linear, 1 thread, loaded 2-core
machine): at 16 x 64 -> 128 composite 75–130 µs, opaque 300–370 µs; at 64 x 256 -> 256 (4.2 M)
composite 280–360, opaque 350–420; at 128 x 256 -> 256 (8.4 M) composite 440–690, opaque
320–590 (docs/performance.md)."""


def composite_merged(x, weight, bias, A, B, scale, x_a=None):
    """y = x·(W + scale·B·A)ᵀ + b in two aten ops. Autograd gives dx = dy·(W + scale·B·A),
    dW' = dyᵀ·x (one dense out x in product: why only small sites take this route), then
    dB = scale·dW'·Aᵀ and dA = scale·Bᵀ·dW' through addmm's backward; dW and db when asked."""
    return F.linear(x, torch.addmm(weight, B, A, alpha=scale), bias)


def composite_unmerged(x, weight, bias, A, B, scale, x_a=None):
    """y = x·Wᵀ + b + (x_a·Aᵀ)·(scale·B)ᵀ in aten ops (a separate adapter input, or dtypes
    that a merged weight would round): scale rides on B (out x r), not on an N-row tensor."""
    y = F.linear(x, weight, bias)
    adapter_in = x if x_a is None else x_a
    if adapter_in.dtype != A.dtype:
        adapter_in = adapter_in.to(A.dtype)
    update = F.linear(F.linear(adapter_in, A), B * scale)
    return y + (update if update.dtype == y.dtype else update.to(y.dtype))


def choose_route(x, weight, bias, A, B, scale, x_a=None):
    """The composite for this call, or None for the opaque op: aten ops when the site's dense
    product is at most ``COMPOSITE_MACS`` (merged when the adapter reads x itself and one
    dtype holds, else unmerged), the opaque op otherwise and under autocast (whose casts would
    round a merged weight and change the opaque op's dtypes). Runs once per site and call, so
    it reads shapes only (the any-device autocast flag: 0.1 µs against 2 µs per device)."""
    out_f, in_f = weight.shape
    if x.numel() * out_f > COMPOSITE_MACS or torch._C._is_any_autocast_enabled():
        return None
    if x_a is None and x.dtype == weight.dtype == A.dtype == B.dtype:
        return composite_merged
    return composite_unmerged


implement_routed(lowrank_linear, "torch", forward, backward, forward_saving=forward_saving, choose=choose_route)
