"""Strided matmul kernel shared by the adapter ops: C (+)= alpha·A·B.

Every low-rank product the adapters need (x·Aᵀ, h·Bᵀ added into the base output, dy·B,
gᵀ·x, ...) is one call of this kernel on strided views, so transposes and the VeRA slices
A_shared[:, :in] / B_shared[:out, :] cost no copies. Accumulation is fp32; operands of
different dtypes (bf16 activations against fp32 adapter weights) are both raised to fp32.
Products whose operands and result are all fp32 use IEEE precision, since that path is
checked against an fp32 reference; where a half-precision tensor is involved, TF32 (10-bit
mantissa, finer than the bf16/fp16 side) keeps the products on the tensor cores. An optional per-column vector multiplies the result (VeRA's b ⊙ ·).

The adapter's products are thin: one of M, N is the rank while K is the token count
(dA = gᵀ·x, dB = dyᵀ·h) or the feature count (h = x·Aᵀ). Tiling only M x N then gives a
few dozen programs, each walking thousands of K steps, on a GPU with 132 SMs. Such
products are split along K: each of SPLIT_K programs per output tile reduces its own K
range and atomically adds its fp32 partial into an fp32 result (alpha and the column
vector are linear, so they apply to each partial).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


def compile_visible() -> bool:
    """Whether the Triton ops register as ``torch.library.triton_op`` (torch.compile traces
    into their kernels; ``OpSpec.implement_visible``) rather than as opaque custom ops: on a
    GPU, not under TRITON_INTERPRET=1, where tracing hands the interpreter fake tensors."""
    return os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, col_scale_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # scalars
    alpha, K_PER_SPLIT,
    # meta-parameters
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOWNCAST: tl.constexpr = None,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (ks[None, :] < k_end), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(ks[:, None] < k_end) & (rn[None, :] < N), other=0.0)
        if DOWNCAST is not None:      # the fp32 side rounded to the half side's dtype: bf16/fp16 MMA
            acc += tl.dot(a.to(DOWNCAST), b.to(DOWNCAST))
        else:
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b, input_precision="tf32")
    acc = acc * alpha
    if HAS_COL_SCALE:
        acc = acc * tl.load(col_scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ATOMIC:                        # split K: c is fp32 and already holds what to add to
        tl.atomic_add(c_ptrs, acc, mask=c_mask)
    else:
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


# Enough programs to fill a large GPU (132 SMs on an H100) about twice over.
TARGET_PROGRAMS = 256


def launch_shape(M: int, N: int, K: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) for an M x K by K x N product, from the sweep in
    bench/matmul_sweep.py on an H100 (docs/kernels.md): 64-row tiles, 128-wide K steps for
    the long reductions, K split until the grid has ~TARGET_PROGRAMS programs (keeping at
    least 4 K steps each), and 64 x 128 output tiles for the rank-K products into y and dx."""
    block_m = _block(M, hi=64)
    block_n = _block(N, hi=128 if M >= N else 64)
    block_k = _block(K, hi=128)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    steps = triton.cdiv(K, block_k)
    split = 1
    if steps >= 8 and tiles < TARGET_PROGRAMS:
        split = max(1, min(steps // 4, triton.cdiv(TARGET_PROGRAMS, tiles)))
    return block_m, block_n, block_k, split


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
    # fp32 all through: IEEE products, as the fp32 reference. A half-precision operand or
    # result carries more error than TF32's rounding of the fp32 side, and TF32 runs on the
    # tensor cores where IEEE fp32 falls back to FMA loops (several times slower on an H100).
    ieee = a.dtype == b.dtype == out.dtype == torch.float32
    BLOCK_M, BLOCK_N, BLOCK_K, split = launch_shape(M, N, K)
    k_per_split = triton.cdiv(triton.cdiv(K, split), BLOCK_K) * BLOCK_K
    split = triton.cdiv(K, k_per_split)
    target = out
    if split > 1:                     # fp32 partial sums added atomically
        if out.dtype == torch.float32:
            if not accumulate:
                out.zero_()
        else:
            target = torch.zeros((M, N), dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), split)
    # while torch.compile traces (a triton_op's forward or backward), the launch becomes a node
    # it can see and schedule; at run time the kernel is called directly (no extra dispatch)
    kernel = torch.library.wrap_triton(_matmul_kernel) if torch.compiler.is_compiling() else _matmul_kernel
    kernel[grid](
        a, b, target, col_scale if col_scale is not None else target,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), target.stride(0), target.stride(1),
        float(alpha), k_per_split,
        ACCUMULATE=accumulate, UPCAST=upcast, IEEE=ieee, HAS_COL_SCALE=col_scale is not None,
        ATOMIC=split > 1, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=4,
    )
    if target is not out:
        if accumulate:
            out.add_(target)
        else:
            out.copy_(target)
    return out
