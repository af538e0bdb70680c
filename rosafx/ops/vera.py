"""``rosafx::vera_linear``: y = x·Wᵀ + bias + b ⊙ ((d ⊙ (x_a·A_slᵀ))·B_slᵀ).

A_shared (r x in_max) and B_shared (out_max x r) are the frozen random pair shared by
every VeRA site of a model; the op slices A_sl = A_shared[:, :in], B_sl = B_shared[:out, :]
itself, so the graph holds one get_attr per shared tensor and no per-site copy. d (r) and
b (out) are the trained vectors. ``x_a`` is the adapter's input (dropout(x)); None means x.
The adapter path runs in d's dtype and is cast back to the base output's dtype.

How it runs, and why: with VeRA's large rank (256 against in = out = 384 on MiniLM) the
two N-row products x·A_slᵀ and (·)·B_slᵀ cost about 2/3 of the base matmul each. The
site's update is a weight, ΔW = diag(b)·B_sl·diag(d)·A_sl (out·r·in flops, independent of
N), so the forward and dx read a transient W + ΔW instead: one dense matmul each, as in
the frozen model. Only d's and b's gradients need N-row work, both from one out x r matrix
Mᵀ = dyᵀ·x_a·A_slᵀ, formed the cheaper way round (see ``_dyT_h``). The backward reuses
the forward's W + ΔW (``forward_saving``) when it is no larger than x.

The transient is the wrong tool in two cases, which take the low-rank route instead (the
base product as in the frozen model, then y += b ⊙ ((d ⊙ (x_a·A_slᵀ))·B_slᵀ) in d's dtype;
``_low_rank_pays``): a layer large against the rank (out·in > r·(in + out): at 4096 x 4096,
rank 256, the transient is 8x the flops), and a half-precision base with fp32 vectors,
where W + ΔW in fp32 would move the base product itself off bf16 (on an H100 this op took
11.9 ms that way against 2.0 ms for the Triton one).

``rosafx::vera_linear_given_h`` is the same op with h = x_a·A_slᵀ given (no gradient flows
into h: y does not depend on it); sibling fusion (passes/fuse_siblings.py) computes h once
for sites that read the same input with the same A slice.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rosafx.ops.spec import implement_routed, kept_for_backward, op_spec, rows


@op_spec(roles={"input": "x", "weight": "weight", "bias": "bias", "down": "A_shared", "up": "B_shared",
                "down_scale": "d", "up_scale": "b", "adapter_input": "x_a"})
def vera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_shared: Tensor, B_shared: Tensor,
                d: Tensor, b: Tensor, x_a: Optional[Tensor] = None) -> Tensor:
    """y = x·Wᵀ + bias + b ⊙ ((d ⊙ (x_a·A_slᵀ))·B_slᵀ) with A_sl = A_shared[:, :in],
    B_sl = B_shared[:out, :]; ``x_a`` is the adapter's input (dropout(x)), None means x.

    Gradients, every leading dim flattened to N rows, h = x_a·A_slᵀ (N x r),
    ΔW = diag(b)·B_sl·diag(d)·A_sl and Mᵀ = dyᵀ·h (out x r):

        dx    = dy·(W + ΔW)          when the adapter reads x itself
        dx    = dy·W,  dx_a = dy·ΔW   when it has its own input
        dd[k] = Σ_n h[n,k]·((dy ⊙ b)·B_sl)[n,k] = Σ_o Mᵀ[o,k]·b[o]·B_sl[o,k]
        db[o] = Σ_n dy[n,o]·((h ⊙ d)·B_slᵀ)[n,o] = Σ_k Mᵀ[o,k]·d[k]·B_sl[o,k]
        dW    = dyᵀ·x,  dbias = Σ_n dy   (only when asked: calibration hooks on W)

    A_shared and B_shared are frozen in VeRA; an implementation may leave them without a
    gradient (the torch one does).
    """


@op_spec(roles={"input": "x", "weight": "weight", "bias": "bias", "down": "A_shared", "up": "B_shared",
                "down_scale": "d", "up_scale": "b", "adapter_input": "x_a", "down_output": "h"})
def vera_linear_given_h(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_shared: Tensor, B_shared: Tensor,
                        d: Tensor, b: Tensor, x_a: Optional[Tensor], h: Tensor) -> Tensor:
    """``vera_linear`` with h = x_a·A_slᵀ given (sibling fusion computes it once for the
    sites that read the same input with the same A slice). y does not depend on h, so h
    gets no gradient; the others are ``vera_linear``'s, with Mᵀ = dyᵀ·h from the given h.
    """


def _slices(weight: Tensor, A_shared: Tensor, B_shared: Tensor) -> tuple[Tensor, Tensor]:
    out_f, in_f = weight.shape
    if A_shared.shape[1] < in_f or B_shared.shape[0] < out_f:
        raise ValueError(f"vera_linear: shared A {tuple(A_shared.shape)} / B {tuple(B_shared.shape)} are smaller "
                         f"than the site's weight {tuple(weight.shape)}")
    return A_shared[:, :in_f], B_shared[:out_f, :]


def delta_weight(A: Tensor, B: Tensor, d: Tensor, b: Tensor) -> Tensor:
    """ΔW = diag(b)·B_sl·diag(d)·A_sl (out x in) in d's dtype."""
    return (B.to(d.dtype) * b[:, None]) @ (A.to(d.dtype) * d[:, None])


def _effective_weight(weight: Tensor, A: Tensor, B: Tensor, d: Tensor, b: Tensor) -> Tensor:
    """W + ΔW, a new tensor in d's dtype."""
    merged = weight.to(d.dtype, memory_format=torch.contiguous_format, copy=True)
    return merged.addmm_(B.to(d.dtype) * b[:, None], A.to(d.dtype) * d[:, None])


def _low_rank_pays(x: Tensor, weight: Tensor, A: Tensor, d: Tensor) -> bool:
    """Whether to skip the transient (module docstring): x and W share a dtype (the base
    product runs as in the frozen model) and either d's dtype differs or the layer is large
    against the rank."""
    out_f, in_f = weight.shape
    return x.dtype == weight.dtype and (d.dtype != x.dtype or out_f * in_f > A.shape[0] * (in_f + out_f))


def _transient_and_output(x, weight, bias, A_shared, B_shared, d, b, x_a) -> tuple[Tensor, Optional[Tensor]]:
    """(y, the transient weight the backward reads again: W + ΔW, or ΔW when x_a is given;
    None on the low-rank route)."""
    A, B = _slices(weight, A_shared, B_shared)
    if _low_rank_pays(x, weight, A, d):
        y = F.linear(x, weight, bias)
        h = rows(x if x_a is None else x_a).to(d.dtype) @ A.to(d.dtype).t()
        update = (h * d) @ (B.to(d.dtype) * b[:, None]).t()                 # N x out, d's dtype
        y2 = rows(y)
        if y.dtype == d.dtype and y.is_contiguous():
            y2.add_(update)
            return y, None
        return (y2 + update.to(y.dtype)).reshape(y.shape), None
    if x_a is None:
        merged = _effective_weight(weight, A, B, d, b)
        if weight.dtype == d.dtype and x.dtype == d.dtype:
            return F.linear(x, merged, bias), merged
        y = F.linear(x.to(d.dtype), merged, None if bias is None else bias.to(d.dtype))
        return y.to(x.dtype), merged
    y = F.linear(x, weight, bias)
    delta = delta_weight(A, B, d, b)
    y2, x_a2 = rows(y), rows(x_a).to(d.dtype)
    if y.dtype == d.dtype and y.is_contiguous():
        y2.addmm_(x_a2, delta.t())
        return y, delta
    return (y2 + (x_a2 @ delta.t()).to(y.dtype)).reshape(y.shape), delta


def forward(x, weight, bias, A_shared, B_shared, d, b, x_a=None) -> Tensor:
    return _transient_and_output(x, weight, bias, A_shared, B_shared, d, b, x_a)[0]


def forward_saving(x, weight, bias, A_shared, B_shared, d, b, x_a=None) -> tuple[Tensor, tuple]:
    """forward, and the transient weight for the backward (spec.py's opt-in) when it is no
    larger than x, which the op saves anyway: keeping it costs at most x's memory again and
    spares the backward an out·r·in product (37.7 M multiply-adds at 384 x 384, rank 256)."""
    y, transient = _transient_and_output(x, weight, bias, A_shared, B_shared, d, b, x_a)
    return y, kept_for_backward(transient, x)


def _dyT_h(dy2: Tensor, adapter_in: Tensor, A: Tensor, h: Optional[Tensor]) -> Tensor:
    """Mᵀ = dyᵀ·h = dyᵀ·x_a·A_slᵀ (out x r), the cheaper way round: through h = x_a·A_slᵀ
    (N·r·(in + out) flops) or through G = dyᵀ·x_a (N·in·out + out·in·r), which wins when
    the rank is large against in·out/(in + out)."""
    n, out_f, in_f, r = dy2.shape[0], dy2.shape[1], A.shape[1], A.shape[0]
    if h is not None:
        return dy2.t() @ rows(h).to(dy2.dtype)
    if n * r * (in_f + out_f) <= n * in_f * out_f + out_f * in_f * r:
        return dy2.t() @ (adapter_in @ A.t())
    return (dy2.t() @ adapter_in) @ A.t()


def backward(dy, needs, x, weight, bias, A_shared, B_shared, d, b, x_a=None, h=None, saved=None):
    """The spec's gradients (``vera_linear.doc``) in torch; W + ΔW is dense and transient
    (``saved`` by the forward, or built again) except on the low-rank route, where dx and
    dx_a go through ((dy ⊙ b)·B_sl ⊙ d)·A_sl; Mᵀ formed the cheaper way round."""
    transient = saved[0] if saved else None
    A, B = _slices(weight, A_shared, B_shared)
    low_rank = _low_rank_pays(x, weight, A, d)
    A, B = A.to(d.dtype), B.to(d.dtype)
    dy2 = rows(dy)
    dyd = dy2.to(d.dtype)
    dx = dW = dbias = dd = db = dx_a = None
    if low_rank and (needs[0] or needs[7]):
        to_adapter_in = (((dyd * b) @ B) * d) @ A              # ∂L/∂x_a = ((dy ⊙ b)·B_sl ⊙ d)·A_sl
        if needs[0]:
            dx = dy2 @ weight.to(dy2.dtype)
            if x_a is None:
                dx = dx + to_adapter_in.to(dx.dtype)
            dx = dx.reshape(x.shape)
        if needs[7] and x_a is not None:
            dx_a = to_adapter_in.to(x_a.dtype).reshape(x_a.shape)
    elif needs[0]:
        if x_a is None:
            merged = transient if transient is not None else _effective_weight(weight, A, B, d, b)
            dx = (dyd @ merged).to(x.dtype)
        else:
            dx = dy2 @ weight.to(dy2.dtype)
        dx = dx.reshape(x.shape)
    if needs[7] and x_a is not None and not low_rank:
        delta = transient if transient is not None else delta_weight(A, B, d, b)
        dx_a = (dyd @ delta).to(x_a.dtype).reshape(x_a.shape)
    if needs[1]:
        dW = (dy2.t() @ rows(x).to(dy2.dtype)).to(weight.dtype)
    if needs[2] and bias is not None:
        dbias = dy2.sum(0)
    if needs[5] or needs[6]:
        Mt = _dyT_h(dyd, rows(x if x_a is None else x_a).to(d.dtype), A, h)
        if needs[5]:
            dd = (Mt * B).mul_(b[:, None]).sum(0)
        if needs[6]:
            db = (Mt * B).mul_(d).sum(1)
    return dx, dW, dbias, None, None, dd, db, dx_a, None


def forward_given_h(x, weight, bias, A_shared, B_shared, d, b, x_a, h) -> Tensor:
    return forward(x, weight, bias, A_shared, B_shared, d, b, x_a)


def forward_given_h_saving(x, weight, bias, A_shared, B_shared, d, b, x_a, h) -> tuple[Tensor, tuple]:
    return forward_saving(x, weight, bias, A_shared, B_shared, d, b, x_a)


# ---------------------------------------------------------------- routes (issue 22)
# As rosafx::lowrank_linear (ops/lowrank.py, whose measurements set the limit): a small site
# costs what the Python around the opaque op costs (its autograd.Function and Python
# backward), so it runs as aten ops that autograd differentiates in C++.
COMPOSITE_MACS = 1 << 22
"""The largest site run as aten ops, in multiply-adds of its dense product N·in·out and of
its update ΔW (out·r·in, which the merged composite forms in the forward and, through
addmm's backward, twice more in the backward)."""


def composite_merged(x, weight, bias, A_shared, B_shared, d, b, x_a=None):
    """y = x·(W + diag(b)·B_sl·diag(d)·A_sl)ᵀ + bias in aten ops; autograd reaches d and b
    through the products' backward (A_shared, B_shared are frozen: no gradient formed)."""
    A, B = _slices(weight, A_shared, B_shared)
    return F.linear(x, torch.addmm(weight, B * b[:, None], A * d[:, None]), bias)


def composite_unmerged(x, weight, bias, A_shared, B_shared, d, b, x_a=None):
    """y = x·Wᵀ + bias + b ⊙ ((d ⊙ (x_a·A_slᵀ))·B_slᵀ) in aten ops, in d's dtype (an adapter
    input of its own, or dtypes a merged weight would round)."""
    A, B = _slices(weight, A_shared, B_shared)
    adapter_in = x if x_a is None else x_a
    if adapter_in.dtype != d.dtype:
        adapter_in = adapter_in.to(d.dtype)
    update = F.linear(F.linear(adapter_in, A.to(d.dtype)) * d, B.to(d.dtype)) * b
    y = F.linear(x, weight, bias)
    return y + (update if update.dtype == y.dtype else update.to(y.dtype))


def choose_route(x, weight, bias, A_shared, B_shared, d, b, x_a=None):
    """The composite for this call, or None for the opaque op (under autocast too, as lowrank's)."""
    out_f, in_f = weight.shape
    if (x.numel() * out_f > COMPOSITE_MACS or out_f * in_f * A_shared.shape[0] > COMPOSITE_MACS
            or torch._C._is_any_autocast_enabled()):
        return None
    one_dtype = x.dtype == weight.dtype == d.dtype == b.dtype == A_shared.dtype == B_shared.dtype
    # the merged weight's products (out·r·in) against the update's own (N·r·(in + out)): few rows, unmerged
    if x_a is None and one_dtype and out_f * in_f <= x.numel() // in_f * (in_f + out_f):
        return composite_merged
    return composite_unmerged


implement_routed(vera_linear, "torch", forward, backward, forward_saving=forward_saving, choose=choose_route)
vera_linear_given_h.implement("torch", forward_given_h, backward, forward_saving=forward_given_h_saving)
