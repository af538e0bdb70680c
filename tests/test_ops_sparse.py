"""rosafx::sparse_lowrank_linear against float64 dense autograd, with odd shapes and an
empty row; the values' gradient is sampled at the mask."""
import pytest
import torch
import torch.nn.functional as F

import rosafx  # noqa: F401

op = torch.ops.rosafx.sparse_lowrank_linear.default


def make_mask(out_features, in_features, nnz, g):
    flat = torch.randperm(out_features * in_features, generator=g)[:nnz].sort().values
    rows, cols = flat // in_features, flat % in_features
    keep = rows != 3  # row 3 stays empty
    rows, cols = rows[keep], cols[keep]
    crow = torch.zeros(out_features + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
    return crow, cols, rows


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("separate_input", [False, True])
def test_forward_and_gradients_match_float64(rank, separate_input):
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 29, 37
    crow, col, rows = make_mask(out_f, in_f, 60, g)
    x = torch.randn(3, 5, in_f, generator=g, requires_grad=True)
    W, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
    A = torch.randn(rank, in_f, generator=g, requires_grad=True)
    B = torch.randn(out_f, rank, generator=g, requires_grad=True)
    values = torch.randn(col.numel(), generator=g, requires_grad=True)
    x_a = torch.randn(3, 5, in_f, generator=g, requires_grad=True) if separate_input else None
    y = op(x, W, b, A, B, 0.7, crow, col, values, x_a)
    dy = torch.randn(y.shape, generator=g)
    inputs = [x, A, B, values] + ([x_a] if separate_input else [])
    grads = torch.autograd.grad(y, inputs, dy)

    d = [t.detach().double().requires_grad_() for t in inputs]
    x64, A64, B64, v64 = d[:4]
    xa64 = d[4] if separate_input else x64
    S = torch.zeros(out_f, in_f, dtype=torch.float64).index_put((rows, col), v64)
    y64 = F.linear(x64, W.double() + S, b.double()) + 0.7 * (xa64 @ A64.t()) @ B64.t()
    grads64 = torch.autograd.grad(y64, d, dy.double())
    assert torch.allclose(y.double(), y64, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, grads64):
        if want.numel() == 0:
            assert got.numel() == 0
            continue
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


def test_empty_mask_is_lora():
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    A, B = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    empty = torch.zeros(0, dtype=torch.long)
    y = op(x, W, None, A, B, 1.5, torch.zeros(7, dtype=torch.long), empty, torch.zeros(0), None)
    assert torch.allclose(y, torch.ops.rosafx.lowrank_linear.default(x, W, None, A, B, 1.5, None), atol=1e-6)


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    crow, col, _ = make_mask(5, 8, 10, g)
    args = (torch.randn(2, 3, 8, generator=g, requires_grad=True), torch.randn(5, 8, generator=g), None,
            torch.randn(2, 8, generator=g, requires_grad=True), torch.randn(5, 2, generator=g, requires_grad=True),
            0.5, crow, col, torch.randn(col.numel(), generator=g, requires_grad=True), None)
    # aot_dispatch is left out: building a CSR tensor inside the op is not traceable by AOT
    # autograd (torch.compile), which rosafx does not use; export uses the fake impl only
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
