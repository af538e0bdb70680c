"""Strided matmul kernel shared by the adapter ops: C (+)= alpha·A·B.

Every low-rank product the adapters need (x·Aᵀ, h·Bᵀ added into the base output, dy·B,
gᵀ·x, ...) is one call of this kernel on strided views, so transposes and the VeRA slices
A_shared[:, :in] / B_shared[:out, :] cost no copies. Accumulation is fp32; operands of
different dtypes (bf16 activations against fp32 adapter weights) are both raised to fp32,
and fp32 products use IEEE precision (no TF32), since the adapter path is checked against
an fp32 reference. An optional per-column vector multiplies the result (VeRA's b ⊙ ·).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, col_scale_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # scalars
    alpha,
    # meta-parameters
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    acc = acc * alpha
    if HAS_COL_SCALE:
        acc = acc * tl.load(col_scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def matmul(a: Tensor, b: Tensor, *, alpha: float = 1.0, out: Optional[Tensor] = None,
           accumulate: bool = False, col_scale: Optional[Tensor] = None,
           out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``out (+)= alpha·(a·b) [⊙ col_scale]`` for 2-D strided ``a`` (M x K), ``b`` (K x N).

    Writes into ``out`` when given (``accumulate`` adds to what it holds), else allocates an
    M x N tensor of ``out_dtype`` (default: fp32 when the operands' dtypes differ)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
    if a.device != b.device:
        raise ValueError(f"matmul: operands on {a.device} and {b.device}")
    M, K = a.shape
    N = b.shape[1]
    upcast = a.dtype != b.dtype
    if out is None:
        dtype = out_dtype or (torch.float32 if upcast else a.dtype)
        out = (torch.zeros if accumulate else torch.empty)((M, N), dtype=dtype, device=a.device)
    elif tuple(out.shape) != (M, N):
        raise ValueError(f"matmul: out has shape {tuple(out.shape)}, expected {(M, N)}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.zero_()
        return out
    ieee = torch.float32 in (a.dtype, b.dtype)
    BLOCK_M, BLOCK_N, BLOCK_K = _block(M), _block(N), _block(K, hi=32)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _matmul_kernel[grid](
        a, b, out, col_scale if col_scale is not None else out,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        float(alpha),
        ACCUMULATE=accumulate, UPCAST=upcast, IEEE=ieee, HAS_COL_SCALE=col_scale is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out
