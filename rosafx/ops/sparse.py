"""``rosafx::sparse_lowrank_linear``: y = x·(W + S)ᵀ + b + scale·(x_a·Aᵀ)·Bᵀ.

Used by rosa-robust. S (out x in) is a CSR matrix given by (crow_indices, col_indices,
values); only ``values`` trains. Rank 0 (A, B empty) is pure sparse adaptation.

How it runs on CPU, and why: a sparse-dense product costs far more per flop than a dense
one (it gathers), and at 1 % density S·xᵀ and dy·S each took about as long as the dense
x·Wᵀ on 2 cores. So the forward and dx read a transient dense W + S (one out x in copy of
W plus an index_add of the values; saved for the backward when it is no larger than x,
which the op saves anyway, else built again there; scale·B·A is added into it too when the
adapter reads x, so the low-rank term needs no N-row product in the forward and dx), which costs one weight copy instead of two sparse
products per step and needs no transposed copy of S at all. The only sparse kernel left is
the values' gradient, an SDDMM sampled at the mask (``torch.sparse.sampled_addmm``,
vectorised along the N rows), fed with both operands N-contiguous. Nothing of size out x in
is kept between steps, and no N x out / N x in buffer is zero-filled.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rosafx.ops.spec import kept_for_backward, op_spec, rows

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


@op_spec(roles={"input": "x", "weight": "weight", "bias": "bias", "down": "A", "up": "B", "scale": "scale",
                "adapter_input": "x_a"})
def sparse_lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                          crow_indices: Tensor, col_indices: Tensor, values: Tensor,
                          x_a: Optional[Tensor] = None) -> Tensor:
    """y = x·(W + S)ᵀ + b + scale·(x_a·Aᵀ)·Bᵀ, S = CSR(crow_indices, col_indices, values) of
    W's shape; ``x_a`` is the adapter's input (dropout(x)), None means x itself.

    Gradients, with N rows, h = x_a·Aᵀ, g = scale·dy·B and S the CSR matrix at mask M:

        dx      = dy·(W + S) (+ g·A when the adapter reads x)
        dx_a    = g·A,   dA = gᵀ·x_a,   dB = scale·dyᵀ·h        (as lowrank_linear)
        dvalues = (dyᵀ·x)[M]          ∂y[n,o]/∂S[o,c] = x[n,c]; only the |M| sampled dot
                                      products are needed (an SDDMM)
        dW      = dyᵀ·x,    db = Σ dy   (only when asked: calibration)
    """


def csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


@torch.library.custom_op("rosafx::dense_with_sparse", mutates_args=())
def dense_with_sparse(weight: Tensor, crow: Tensor, col: Tensor, values: Tensor) -> Tensor:
    """W + S as a new dense tensor in ``values``' dtype (S's entries are not rounded to a
    half-precision W's grid). An op of its own so that torch.compile traces the backward
    without building index tensors of data-dependent size."""
    merged = weight.to(values.dtype, memory_format=torch.contiguous_format, copy=True)
    if values.numel():
        entry_rows = torch.repeat_interleave(torch.arange(weight.shape[0], device=crow.device), crow.diff(),
                                             output_size=col.numel())
        merged.view(-1).index_add_(0, entry_rows * weight.shape[1] + col, values.detach())
    return merged


@dense_with_sparse.register_fake
def _(weight, crow, col, values):
    return weight.new_empty(weight.shape, dtype=values.dtype)


def _folds_low_rank(A: Tensor, B: Tensor, values: Tensor, x_a: Optional[Tensor]) -> bool:
    """Whether scale·B·A joins the transient W + S (out·in·r flops): only when it exists (a
    non-empty mask), the adapter reads x itself and A, B share S's dtype. Then the forward and
    dx need no N-row low-rank product at all, as in ops/lowrank.py's merged route."""
    return values.numel() > 0 and A.shape[0] > 0 and x_a is None and A.dtype == B.dtype == values.dtype


def _dense_weight(weight, A, B, scale, crow, col, values, fold: bool) -> Tensor:
    """W + S (+ scale·B·A when ``fold``), a new tensor in values' dtype."""
    merged = dense_with_sparse(weight, crow, col, values)
    return merged.addmm_(B, A, alpha=scale) if fold else merged


def _output_and_transient(x, weight, bias, A, B, scale, crow, col, values, x_a) -> tuple[Tensor, Optional[Tensor]]:
    """y, and the transient W + S (+ scale·B·A) it was computed with (None for an empty mask)."""
    folded = _folds_low_rank(A, B, values, x_a)
    merged = None
    if values.numel():
        merged = _dense_weight(weight, A, B, scale, crow, col, values, folded)
        if weight.dtype != values.dtype:
            y = F.linear(x.to(values.dtype), merged, None if bias is None else bias.to(values.dtype)).to(x.dtype)
        else:
            y = F.linear(x, merged, bias)
    else:
        y = F.linear(x, weight, bias)
    if A.shape[0] > 0 and not folded:
        h = (A @ rows(x if x_a is None else x_a).to(A.dtype).t()).t()            # (N, r); A·xᵀ: N inner
        y2 = rows(y)
        if y.dtype == B.dtype and y.is_contiguous():
            y2.addmm_(h, B.t(), alpha=scale)                                     # in place: no N x out temporary
        else:
            y = (y2 + (scale * (h @ B.t())).to(y.dtype)).reshape(y.shape)
    return y, merged


def forward(x, weight, bias, A, B, scale, crow, col, values, x_a=None) -> Tensor:
    return _output_and_transient(x, weight, bias, A, B, scale, crow, col, values, x_a)[0]


def forward_saving(x, weight, bias, A, B, scale, crow, col, values, x_a=None) -> tuple[Tensor, tuple]:
    """forward, and the transient dense weight for the backward (spec.py's opt-in) when it is
    no larger than x: at most x's memory again, one weight copy and index_add less per step."""
    y, merged = _output_and_transient(x, weight, bias, A, B, scale, crow, col, values, x_a)
    return y, kept_for_backward(merged, x)


def _rows_per_block(out_features: int, in_features: int) -> int:
    """Rows of dy and x per SDDMM block: the power of two in [128, 1024] at or below 2 MB of
    fp32 for both blocks together (512 rows at 384 x 384 and 256 at 384 x 1536 timed best
    on the 2-core machine, whose L2 is 1 MB per core)."""
    rows_ = (1 << 21) // (4 * (out_features + in_features))
    return 1 << max(7, min(10, rows_.bit_length() - 1))


@torch.library.custom_op("rosafx::sampled_dyT_x", mutates_args=())
def sampled_dyT_x(dy2: Tensor, x2: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """(dyᵀ·x)[M] as an SDDMM, in dy's dtype. The CPU kernel takes dot products along N
    between a row of its first operand and a column of its second, so both are passed
    N-contiguous (dyᵀ and xᵀ copied); x in its natural row-major layout made it several
    times slower. The N rows go in blocks (``_rows_per_block``) whose partial sums are
    added: transposing and reading a block that stays in cache beat one pass over all N
    rows (384 x 384 site, N = 2048, 1.5625 %: 3.7 → 2.1 ms; 1536-wide sites 8.1-8.7 → 6.7
    ms; scratch timing, 1 thread). An op of its own: a CSR tensor cannot be built while
    torch.compile traces the backward."""
    mask = csr(crow, col, dy2.new_zeros(col.numel()), (dy2.shape[1], x2.shape[1]))
    block = _rows_per_block(dy2.shape[1], x2.shape[1])
    total = None
    for start in range(0, dy2.shape[0], block):
        dy_block, x_block = dy2[start:start + block], x2[start:start + block].to(dy2.dtype)
        part = torch.sparse.sampled_addmm(mask, dy_block.t().contiguous(), x_block.t().contiguous().t(),
                                          beta=0.0).values()
        total = part if total is None else total.add_(part)
    return total if total is not None else dy2.new_zeros(col.numel())


@sampled_dyT_x.register_fake
def _(dy2, x2, crow, col):
    return dy2.new_empty(col.shape)


def backward(dy, needs, x, weight, bias, A, B, scale, crow, col, values, x_a=None, saved=None):
    """The spec's gradients (``sparse_lowrank_linear.doc``) in torch; W + S is dense and
    transient (``saved`` by the forward, or built again), dvalues an SDDMM."""
    dy2, x2 = rows(dy), rows(x)
    low_rank = A.shape[0] > 0
    adapter_in = rows(x if x_a is None else x_a).to(A.dtype)
    dyA = dy2.to(A.dtype)
    # (Bᵀ·dyᵀ)ᵀ and (hᵀ·dy)ᵀ: see ops/lowrank.py (MKL's skinny-product layouts)
    folded = _folds_low_rank(A, B, values, x_a)
    need_g = low_rank and (needs[3] or needs[9] or (needs[0] and not folded))
    g = (B.t() @ dyA.t()).t().mul_(scale) if need_g else None       # (N, r)
    dx = dW = db = dA = dB = dvalues = dx_a = None
    if needs[0]:
        if values.numel():
            merged = saved[0] if saved else _dense_weight(weight, A, B, scale, crow, col, values, folded)
            dx = dy2.to(merged.dtype) @ merged
        else:
            dx = dy2 @ weight.to(dy2.dtype)
        if x_a is None and low_rank and not folded:
            if dx.dtype == A.dtype:
                dx.addmm_(g, A)
            else:
                dx = dx + (g @ A).to(dx.dtype)
        dx = dx.to(x.dtype).reshape(x.shape)
    if needs[9]:
        dx_a = (g @ A).to(x_a.dtype).reshape(x_a.shape) if low_rank else torch.zeros_like(x_a)
    if needs[1]:
        dW = (dy2.t() @ x2.to(dy2.dtype)).to(weight.dtype)
    if needs[2] and bias is not None:
        db = dy2.sum(0)
    if needs[3]:
        dA = g.t() @ adapter_in if low_rank else torch.zeros_like(A)
    if needs[4]:
        dB = ((A @ adapter_in.t()) @ dyA).mul_(scale).t() if low_rank else torch.zeros_like(B)
    if needs[8]:
        dvalues = sampled_dyT_x(dy2.to(values.dtype), x2, crow, col) if values.numel() else torch.zeros_like(values)
    return dx, dW, db, dA, dB, None, None, None, dvalues, dx_a


sparse_lowrank_linear.implement("torch", forward, backward, forward_saving=forward_saving)
