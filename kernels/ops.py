"""Triton twins of the registered adapter ops, for ``rosafx.lower``.

``rosafx::<op>_triton`` takes exactly the arguments of ``rosafx::<op>`` (x, weight, bias
first, then the adapter tensors, then x_a), so lowering only retargets graph nodes and every
pass that reads node.args (merge, resample) keeps working on a lowered graph. Each has a
fake impl (shape only) and its autograd from the kernel file's backward launcher.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .lowrank_linear import lowrank_backward, lowrank_forward
from .sparse_lowrank_linear import sparse_lowrank_backward, sparse_lowrank_forward
from .vera_linear import vera_backward, vera_forward


# --- rosafx::lowrank_linear_triton ------------------------------------------------------

@torch.library.custom_op("rosafx::lowrank_linear_triton", mutates_args=())
def lowrank_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                          scale: float, x_a: Optional[Tensor] = None) -> Tensor:
    return lowrank_forward(x, weight, bias, A, B, scale, x_a)[0]


@lowrank_linear_triton.register_fake
def _(x, weight, bias, A, B, scale, x_a=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _lowrank_setup(ctx, inputs, output):
    x, weight, bias, A, B, scale, x_a = (tuple(inputs) + (None,))[:7]
    ctx.scale, ctx.has_bias = scale, bias is not None
    ctx.save_for_backward(x, weight, A, B, x_a)


def _lowrank_backward(ctx, dy):
    """Math in ``kernels.lowrank_linear.lowrank_backward``; h is recomputed, not saved."""
    x, weight, A, B, x_a = ctx.saved_tensors
    n = tuple(ctx.needs_input_grad) + (False,) * (7 - len(ctx.needs_input_grad))
    dx, dW, db, dA, dB, dx_a = lowrank_backward(
        dy, x, weight, A, B, ctx.scale, x_a, None,
        (n[0], n[1], n[2] and ctx.has_bias, n[3], n[4], n[6] and x_a is not None))
    return (dx, dW, db, dA, dB, None, dx_a)[: len(ctx.needs_input_grad)]


lowrank_linear_triton.register_autograd(_lowrank_backward, setup_context=_lowrank_setup)


# --- rosafx::sparse_lowrank_linear_triton -------------------------------------------------

@torch.library.custom_op("rosafx::sparse_lowrank_linear_triton", mutates_args=())
def sparse_lowrank_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                                 scale: float, crow_indices: Tensor, col_indices: Tensor, values: Tensor,
                                 x_a: Optional[Tensor] = None) -> Tensor:
    return sparse_lowrank_forward(x, weight, bias, A, B, scale, crow_indices, col_indices, values, x_a)


@sparse_lowrank_linear_triton.register_fake
def _(x, weight, bias, A, B, scale, crow_indices, col_indices, values, x_a=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _sparse_setup(ctx, inputs, output):
    x, weight, bias, A, B, scale, crow, col, values, x_a = (tuple(inputs) + (None,))[:10]
    ctx.scale, ctx.has_bias = scale, bias is not None
    ctx.save_for_backward(x, weight, A, B, crow, col, values, x_a)


def _sparse_backward(ctx, dy):
    """Math in ``kernels.sparse_lowrank_linear.sparse_lowrank_backward``."""
    x, weight, A, B, crow, col, values, x_a = ctx.saved_tensors
    n = tuple(ctx.needs_input_grad) + (False,) * (10 - len(ctx.needs_input_grad))
    dx, dW, db, dA, dB, dvalues, dx_a = sparse_lowrank_backward(
        dy, x, weight, A, B, ctx.scale, crow, col, values, x_a,
        (n[0], n[1], n[2] and ctx.has_bias, n[3], n[4], n[8], n[9] and x_a is not None))
    return (dx, dW, db, dA, dB, None, None, None, dvalues, dx_a)[: len(ctx.needs_input_grad)]


sparse_lowrank_linear_triton.register_autograd(_sparse_backward, setup_context=_sparse_setup)


# --- rosafx::vera_linear_triton ---------------------------------------------------------------

@torch.library.custom_op("rosafx::vera_linear_triton", mutates_args=())
def vera_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_shared: Tensor, B_shared: Tensor,
                       d: Tensor, b: Tensor, x_a: Optional[Tensor] = None) -> Tensor:
    return vera_forward(x, weight, bias, A_shared, B_shared, d, b, x_a)


@vera_linear_triton.register_fake
def _(x, weight, bias, A_shared, B_shared, d, b, x_a=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _vera_setup(ctx, inputs, output):
    x, weight, bias, A_shared, B_shared, d, b, x_a = (tuple(inputs) + (None,))[:8]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, A_shared, B_shared, d, b, x_a)


def _vera_backward(ctx, dy):
    """Math in ``kernels.vera_linear.vera_backward``."""
    x, weight, A_shared, B_shared, d, b, x_a = ctx.saved_tensors
    n = tuple(ctx.needs_input_grad) + (False,) * (8 - len(ctx.needs_input_grad))
    grads = vera_backward(dy, x, weight, A_shared, B_shared, d, b, x_a,
                          (n[0], n[1], n[2] and ctx.has_bias, n[3], n[4], n[5], n[6], n[7] and x_a is not None))
    return grads[: len(ctx.needs_input_grad)]


vera_linear_triton.register_autograd(_vera_backward, setup_context=_vera_setup)


# reference op name -> its Triton twin's name; lower.py reads ``triton_twins()``
TWIN_NAMES = {
    "lowrank_linear": "lowrank_linear_triton",
    "sparse_lowrank_linear": "sparse_lowrank_linear_triton",
    "vera_linear": "vera_linear_triton",
}


def triton_twins() -> dict:
    """reference op -> Triton op, for the reference ops registered now (looked up on every
    call, so a method module imported after this one is still covered)."""
    return {getattr(torch.ops.rosafx, ref).default: getattr(torch.ops.rosafx, twin).default
            for ref, twin in TWIN_NAMES.items() if hasattr(torch.ops.rosafx, ref)}
