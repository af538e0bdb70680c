"""``rosafx::sparse_lowrank_linear``: y = x·(W + S)ᵀ + b + scale·(x_a·Aᵀ)·Bᵀ.

Used by rosa-robust. S (out x in) is a CSR matrix given by (crow_indices, col_indices,
values); only ``values`` trains. Nothing of size out x in is formed: the forward applies S
with a sparse-dense product, and the values' gradient is an SDDMM sampled at the mask.
Rank 0 (A, B empty) is pure sparse adaptation.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def csr_transposed(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """Sᵀ as CSR (in x out): re-sort the entries by column."""
    rows = torch.repeat_interleave(torch.arange(shape[0], device=crow.device), crow.diff())
    order = torch.argsort(col * shape[0] + rows)
    t_crow = torch.zeros(shape[1] + 1, dtype=crow.dtype, device=crow.device)
    t_crow[1:] = torch.cumsum(torch.bincount(col, minlength=shape[1]), 0)
    return csr(t_crow, rows[order], values[order], (shape[1], shape[0]))


@torch.library.custom_op("rosafx::sparse_lowrank_linear", mutates_args=())
def sparse_lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                          crow_indices: Tensor, col_indices: Tensor, values: Tensor,
                          x_a: Optional[Tensor] = None) -> Tensor:
    y = F.linear(x, weight, bias)
    x2 = _rows(x)
    extra = torch.zeros(x2.shape[0], weight.shape[0], dtype=values.dtype, device=x.device)
    if A.shape[0] > 0:
        extra.addmm_(_rows(x if x_a is None else x_a).to(A.dtype) @ A.t(), B.t(), alpha=scale)
    if values.numel() > 0:
        S = csr(crow_indices, col_indices, values, tuple(weight.shape))
        extra += torch.sparse.mm(S, x2.to(values.dtype).t()).t()
    return (_rows(y) + extra.to(y.dtype)).reshape(y.shape)


@sparse_lowrank_linear.register_fake
def _(x, weight, bias, A, B, scale, crow_indices, col_indices, values, x_a=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, A, B, scale, crow, col, values, x_a = (tuple(inputs) + (None,))[:10]
    ctx.scale, ctx.has_bias = scale, bias is not None
    ctx.save_for_backward(x, weight, A, B, crow, col, values, x_a)


def _backward(ctx, dy):
    """With N rows, h = x_a·Aᵀ, g = scale·dy·B and S the CSR matrix at mask M:

        dx      = dy·W + dy·S (+ g·A when the adapter reads x)      dy·S = (Sᵀ·dyᵀ)ᵀ, Sᵀ in CSR
        dx_a    = g·A
        dA      = gᵀ·x_a,   dB = scale·dyᵀ·h
        dvalues = (dyᵀ·x)[M]          an SDDMM: only the |M| sampled dot products are computed
        dW      = dyᵀ·x,    db = Σ dy   (only when asked: calibration)
    """
    x, weight, A, B, crow, col, values, x_a = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * (10 - len(ctx.needs_input_grad))
    shape = tuple(weight.shape)
    dy2, x2 = _rows(dy), _rows(x)
    adapter_in = _rows(x if x_a is None else x_a).to(A.dtype)
    dyA = dy2.to(A.dtype)
    g = (dyA @ B).mul_(ctx.scale)
    dx = dW = db = dA = dB = dvalues = dx_a = None
    if needs[0]:
        dx = dy2 @ weight.to(dy2.dtype)
        extra = torch.zeros(dx.shape, dtype=values.dtype, device=dx.device)
        if values.numel() > 0:
            extra += torch.sparse.mm(csr_transposed(crow, col, values, shape), dy2.to(values.dtype).t()).t()
        if x_a is None and A.shape[0] > 0:
            extra.addmm_(g.to(values.dtype), A.to(values.dtype))
        dx = (dx + extra.to(dx.dtype)).reshape(x.shape)
    if needs[9]:
        dx_a = (g @ A).to(x_a.dtype).reshape(x_a.shape)
    if needs[1]:
        dW = (dy2.t() @ x2.to(dy2.dtype)).to(weight.dtype)
    if needs[2] and ctx.has_bias:
        db = dy2.sum(0)
    if needs[3]:
        dA = g.t() @ adapter_in
    if needs[4]:
        dB = dyA.t() @ (adapter_in @ A.t()).mul_(ctx.scale)
    if needs[8]:
        if values.numel() == 0:
            dvalues = torch.zeros_like(values)
        else:
            mask = csr(crow, col, torch.zeros_like(values), shape)
            sampled = torch.sparse.sampled_addmm(mask, dy2.to(values.dtype).t().contiguous(),
                                                 x2.to(values.dtype), beta=0.0)
            dvalues = sampled.values()
    return (dx, dW, db, dA, dB, None, None, None, dvalues, dx_a)[: len(ctx.needs_input_grad)]


sparse_lowrank_linear.register_autograd(_backward, setup_context=_setup)
