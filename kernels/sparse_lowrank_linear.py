"""Triton implementation of ``rosafx::sparse_lowrank_linear``: y = x·(W + S)ᵀ + b + scale·(x_a·Aᵀ)·Bᵀ.

The op (schema, fake, gradient math, autograd wiring) is declared once in
rosafx/ops/sparse.py; this file plugs its launchers into it as
``rosafx::sparse_lowrank_linear_triton``. S (out x in) is CSR (crow_indices, col_indices,
values); only ``values`` (and A, B) train. The base product stays torch; the low-rank term
uses the shared strided matmul kernel; two Triton kernels handle S without ever forming
anything of size out x in:

- ``_csr_rows_kernel``: out[n, o] += Σ_{j ∈ row o} values[j]·x[n, col[j]] (y += x·Sᵀ; with
  Sᵀ's CSR it gives dx += dy·S). One program per (sparse row, block of N rows); an empty
  sparse row runs no iterations.
- ``_sddmm_kernel``: dvalues[j] = Σ_n dy[n, row[j]]·x[n, col[j]], one program per block
  of nonzeros: the gradient of S sampled at its mask.
Rank 0 (A, B empty) is pure sparse adaptation.

On a GPU those two kernels lose to dense math: at 1 % density on 4096 x 4096 the op took
44.5 ms against 0.34 ms for one cuBLAS bf16 product of the same size (docs/kernels.md). So
on CUDA, above ``DENSE_ABOVE_DENSITY``, S is scattered into a transient dense out x in
matrix in the activations' dtype (kept apart from W, so updates below W's rounding step
still count) and the three S products are cuBLAS calls: y += x·Sᵀ, dx += dy·S, and
dvalues = (dyᵀ·x) read at the mask. The CSR kernels stay for the CPU (interpreter) and for
sparser masks. The dense route's speed has not been measured yet.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from rosafx.ops.sparse import sparse_lowrank_linear as SPARSE_LOWRANK_LINEAR
from rosafx.ops.spec import rows

from rosafx.kernels.lowrank_linear import lowrank_backward
from rosafx.kernels.matmul import matmul


@triton.jit
def _csr_rows_kernel(
    # pointers
    out_ptr, x_ptr, crow_ptr, col_ptr, val_ptr,
    # sizes
    N,
    # strides
    stride_outn, stride_outo, stride_xn, stride_xc,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_NNZ):
        js = j0 + tl.arange(0, BLOCK_NNZ)
        in_row = js < end
        cols = tl.load(col_ptr + js, mask=in_row, other=0)
        vals = tl.load(val_ptr + js, mask=in_row, other=0.0).to(tl.float32)
        xs = tl.load(x_ptr + rn[:, None] * stride_xn + cols[None, :] * stride_xc,
                     mask=(rn[:, None] < N) & in_row[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xs * vals[None, :], axis=1)
    out_ptrs = out_ptr + rn * stride_outn + row * stride_outo
    current = tl.load(out_ptrs, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + acc).to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _sddmm_kernel(
    # pointers
    dval_ptr, dy_ptr, x_ptr, row_ptr, col_ptr,
    # sizes
    N, NNZ,
    # strides
    stride_dyn, stride_dyo, stride_xn, stride_xc,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    js = tl.program_id(0) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
    valid = js < NNZ
    rows = tl.load(row_ptr + js, mask=valid, other=0)
    cols = tl.load(col_ptr + js, mask=valid, other=0)
    acc = tl.zeros((BLOCK_NNZ,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        both = (rn[:, None] < N) & valid[None, :]
        dys = tl.load(dy_ptr + rn[:, None] * stride_dyn + rows[None, :] * stride_dyo, mask=both, other=0.0)
        xs = tl.load(x_ptr + rn[:, None] * stride_xn + cols[None, :] * stride_xc, mask=both, other=0.0)
        acc += tl.sum(dys.to(tl.float32) * xs.to(tl.float32), axis=0)
    tl.store(dval_ptr + js, acc.to(dval_ptr.dtype.element_ty), mask=valid)


def csr_add_rows(out: Tensor, x: Tensor, crow: Tensor, col: Tensor, values: Tensor) -> Tensor:
    """out (N x rows) += x (N x cols) · Sᵀ for CSR S (rows x cols), in place."""
    n_rows = crow.numel() - 1
    if out.shape != (x.shape[0], n_rows):
        raise ValueError(f"csr_add_rows: out {tuple(out.shape)} != ({x.shape[0]}, {n_rows})")
    if values.numel() == 0 or x.shape[0] == 0:
        return out
    BLOCK_N = max(16, min(64, triton.next_power_of_2(x.shape[0])))
    grid = (n_rows, triton.cdiv(x.shape[0], BLOCK_N))        # rows on axis 0: CUDA caps axis 1 at 65535
    _csr_rows_kernel[grid](out, x, crow, col, values, x.shape[0],
                           out.stride(0), out.stride(1), x.stride(0), x.stride(1),
                           BLOCK_N=BLOCK_N, BLOCK_NNZ=16)
    return out


def sddmm(dy: Tensor, x: Tensor, entry_rows: Tensor, col: Tensor, dtype: torch.dtype) -> Tensor:
    """dvalues[j] = (dyᵀ·x)[entry_rows[j], col[j]] for dy (N x out), x (N x in)."""
    nnz = col.numel()
    dvalues = torch.empty(nnz, dtype=dtype, device=dy.device)
    if nnz == 0:
        return dvalues
    BLOCK_NNZ = 32
    _sddmm_kernel[(triton.cdiv(nnz, BLOCK_NNZ),)](dvalues, dy, x, entry_rows, col, dy.shape[0], nnz,
                                                  dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
                                                  BLOCK_N=32, BLOCK_NNZ=BLOCK_NNZ)
    return dvalues


# above this fraction of nonzeros a CUDA run takes the dense route (module docstring)
DENSE_ABOVE_DENSITY = 1e-3


def dense_route(x: Tensor, values: Tensor, weight: Tensor) -> bool:
    return x.is_cuda and values.numel() > DENSE_ABOVE_DENSITY * weight.numel()


def flat_index(crow: Tensor, col: Tensor, n_cols: int) -> Tensor:
    """Each stored entry's position in the flattened dense rows x n_cols matrix."""
    return csr_row_of_each_entry(crow) * n_cols + col


def dense_of(index: Tensor, values: Tensor, shape, dtype: torch.dtype) -> Tensor:
    """S as a dense out x in tensor of ``dtype`` (a transient); ``index`` from ``flat_index``."""
    dense = torch.zeros(shape, dtype=dtype, device=values.device)
    dense.view(-1)[index] = values.to(dtype)
    return dense


def csr_row_of_each_entry(crow: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())


def csr_transposed(crow: Tensor, col: Tensor, values: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """(crow, col, values) of Sᵀ (n_cols x rows) for CSR S (rows x n_cols): the entries
    re-sorted by column (a stable sort keeps rows in order). The only CSR transpose in
    rosafx: the torch implementation needs none (it reads a dense W + S)."""
    entry_rows = csr_row_of_each_entry(crow)
    order = torch.sort(col, stable=True).indices
    t_crow = torch.zeros(n_cols + 1, dtype=crow.dtype, device=crow.device)
    t_crow[1:] = torch.cumsum(torch.bincount(col, minlength=n_cols), 0)
    return t_crow, entry_rows[order].to(col.dtype), values[order]


def _check(x, weight, A, B, crow, col, values):
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
        raise ValueError(f"sparse_lowrank_linear: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} "
                         f"do not fit weight {tuple(weight.shape)}")
    if crow.numel() != out_f + 1 or col.numel() != values.numel():
        raise ValueError(f"sparse_lowrank_linear: CSR needs {out_f + 1} row pointers and one column per value, "
                         f"got {crow.numel()} / {col.numel()} / {values.numel()}")


def sparse_lowrank_forward(x, weight, bias, A, B, scale, crow, col, values, x_a=None) -> Tensor:
    _check(x, weight, A, B, crow, col, values)
    y = F.linear(x, weight, bias).contiguous()
    y2 = rows(y)
    if A.shape[0] > 0:
        h = matmul(rows(x if x_a is None else x_a), A.t(), out_dtype=A.dtype)
        matmul(h, B.t(), alpha=scale, out=y2, accumulate=True)
    if dense_route(x, values, weight):
        S = dense_of(flat_index(crow, col, weight.shape[1]), values, weight.shape, y.dtype)
        y2.addmm_(rows(x), S.t())                                    # y += x·Sᵀ, cuBLAS
    else:
        csr_add_rows(y2, rows(x), crow, col, values)                 # y += x·Sᵀ
    return y


def sparse_lowrank_backward(dy, needs, x, weight, bias, A, B, scale, crow, col, values, x_a=None):
    """The spec's gradients (rosafx/ops/sparse.py): (dx, dW, db, dA, dB, None, None, None,
    dvalues, dx_a) for ``needs`` over the op's ten arguments. The low-rank part is
    lowrank_linear's; dx += dy·S by Sᵀ's CSR rows; dvalues = (dyᵀ·x)[M] by the SDDMM kernel."""
    need_x, need_w, need_b, need_a, need_bmat, _, _, _, need_values, need_xa = needs
    dy2, x2 = rows(dy).contiguous(), rows(x)
    dx, dW, db, dA, dB, _, dx_a = lowrank_backward(dy, (need_x, need_w, need_b, need_a, need_bmat, False, need_xa),
                                                   x, weight, bias, A, B, scale, x_a)
    index = flat_index(crow, col, weight.shape[1]) if dense_route(x, values, weight) else None
    if need_x and values.numel() > 0:
        dx2 = rows(dx).contiguous()
        if index is not None:
            dx2.addmm_(dy2, dense_of(index, values, weight.shape, dx2.dtype))       # dx += dy·S, cuBLAS
        else:
            t_crow, t_col, t_values = csr_transposed(crow, col, values, weight.shape[1])
            csr_add_rows(dx2, dy2, t_crow, t_col, t_values)          # dx += dy·S
        dx = dx2.reshape(x.shape)
    dvalues = None
    if need_values and index is not None:                            # (dyᵀ·x) at the mask, one cuBLAS product
        dvalues = (dy2.t() @ x2.to(dy2.dtype)).view(-1)[index].to(values.dtype)
    elif need_values:
        dvalues = sddmm(dy2, x2, csr_row_of_each_entry(crow), col, values.dtype)
    return dx, dW, db, dA, dB, None, None, None, dvalues, dx_a


sparse_lowrank_linear_triton = SPARSE_LOWRANK_LINEAR.implement("triton", sparse_lowrank_forward,
                                                               sparse_lowrank_backward, opaque_backward=True)


def sparse_lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float,
                          crow_indices: Tensor, col_indices: Tensor, values: Tensor) -> Tensor:
    """y = x·(W + S)ᵀ + b + scale·(x·Aᵀ)·Bᵀ through ``rosafx::sparse_lowrank_linear_triton``."""
    return sparse_lowrank_linear_triton(x, weight, bias, A, B, scale, crow_indices, col_indices, values, None)
