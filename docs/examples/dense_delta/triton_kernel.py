"""Triton implementation of ``rosafx::dense_delta_linear``: y = x·(W + scale·D)ᵀ + b.

The op (schema, fake, gradients, autograd wiring) is declared once in this folder's
``__init__.py``, which names this module (``op_spec(kernels=...)``); ``rosafx.lower`` imports
it when Triton is wanted, and its last line plugs the launchers in as
``rosafx::dense_delta_linear_triton``. The kernel builds the merged weight W + scale·D in one
pass over both (fp32 arithmetic); the matmuls stay torch. The gradients are the torch
implementation's, with this merged weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backward, dense_delta_linear, forward

BLOCK = 1024


@triton.jit
def _merged_weight_kernel(
    # pointers
    w_ptr, d_ptr, out_ptr,
    # sizes and the scale
    n, scale,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    w = tl.load(w_ptr + i, mask=inside).to(tl.float32)
    d = tl.load(d_ptr + i, mask=inside).to(tl.float32)
    tl.store(out_ptr + i, (w + scale * d).to(out_ptr.dtype.element_ty), mask=inside)


def merged_weight(weight: torch.Tensor, D: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale·D in W's dtype (launcher: checks shapes, allocates, launches)."""
    if weight.shape != D.shape:
        raise ValueError(f"dense_delta_linear: D {tuple(D.shape)} does not fit weight {tuple(weight.shape)}")
    weight, D = weight.contiguous(), D.contiguous()
    out = torch.empty_like(weight)
    n = weight.numel()
    _merged_weight_kernel[(triton.cdiv(n, BLOCK),)](weight, D, out, n, float(scale), BLOCK=BLOCK)
    return out


def triton_forward(x, weight, bias, D, scale):
    return forward(x, weight, bias, D, scale, merged=merged_weight)


def triton_backward(dy, needs, x, weight, bias, D, scale):
    return backward(dy, needs, x, weight, bias, D, scale, merged=merged_weight)


dense_delta_linear_triton = dense_delta_linear.implement("triton", triton_forward, triton_backward,
                                                         opaque_backward=True)
