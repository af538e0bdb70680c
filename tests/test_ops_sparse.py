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
@pytest.mark.parametrize("transposed_weight", [False, True])  # a Conv1D site reads aten.t(W): strided
def test_forward_and_gradients_match_float64(rank, separate_input, transposed_weight):
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 29, 37
    crow, col, rows = make_mask(out_f, in_f, 60, g)
    x = torch.randn(3, 5, in_f, generator=g, requires_grad=True)
    W, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
    if transposed_weight:
        W = W.t().contiguous().t()
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
    # the backward's CSR work sits in ops of its own (dense_with_sparse, sampled_dyT_x), so AOT
    # autograd (torch.compile) traces it too
    torch.library.opcheck(op, args)


def _dense_reference(W, b, crow, col, rows, values, x, A, B, scale):
    S = torch.zeros(W.shape, dtype=torch.float64).index_put((rows, col), values)
    return F.linear(x, W + S, b) + scale * (x @ A.t()) @ B.t()


def test_weight_and_bias_gradients_for_calibration():
    """Calibration asks the op for dW (hooks on the frozen weight): dyᵀ·x, vs float64."""
    g = torch.Generator().manual_seed(3)
    crow, col, rows = make_mask(11, 13, 20, g)
    x = torch.randn(2, 4, 13, generator=g)
    W = torch.randn(11, 13, generator=g, requires_grad=True)
    b = torch.randn(11, generator=g, requires_grad=True)
    A, B = torch.randn(2, 13, generator=g), torch.randn(11, 2, generator=g)
    values = torch.randn(col.numel(), generator=g)
    y = op(x, W, b, A, B, 0.5, crow, col, values, None)
    dy = torch.randn(y.shape, generator=g)
    dW, db = torch.autograd.grad(y, [W, b], dy)
    W64, b64 = W.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = _dense_reference(W64, b64, crow, col, rows, values.double(), x.double(), A.double(), B.double(), 0.5)
    dW64, db64 = torch.autograd.grad(y64, [W64, b64], dy.double())
    assert torch.allclose(dW.double(), dW64, atol=1e-4) and torch.allclose(db.double(), db64, atol=1e-4)


def test_bfloat16_weight_matches_float64():
    """A bf16 base weight: S is added in the values' dtype (fp32); output and dvalues vs float64."""
    g = torch.Generator().manual_seed(4)
    crow, col, rows = make_mask(9, 10, 12, g)
    x = torch.randn(3, 10, generator=g)
    W = (torch.randn(9, 10, generator=g) * 8).bfloat16()
    values = torch.full((col.numel(),), 1e-3, requires_grad=True)
    A, B = torch.zeros(0, 10), torch.zeros(9, 0)
    y = op(x.bfloat16(), W, None, A, B, 1.0, crow, col, values, None)
    x64 = x.bfloat16().double()
    want = _dense_reference(W.double(), None, crow, col, rows, values.detach().double(), x64, A.double(),
                            B.double(), 1.0)
    without_s = F.linear(x64, W.double())
    assert y.dtype == torch.bfloat16
    # the rounding of y itself to bf16 is the only error left
    assert torch.allclose(y.double(), want, rtol=2 ** -7, atol=1e-6)
    (dvalues,) = torch.autograd.grad(y.float().sum(), [values])
    want_dv = x64.sum(0)[col]  # d(Σ y)/dS[r, c] = Σ_n x[n, c]
    assert torch.allclose(dvalues.double(), want_dv, rtol=1e-2, atol=1e-2)
    assert not torch.equal(want, without_s)


def test_values_gradient_over_several_row_blocks():
    """dvalues = (dyᵀ·x)[M] summed block by block over N (rows not a multiple of the block,
    an empty mask row) equals float64 autograd through a dense S."""
    from rosafx.ops.sparse import _rows_per_block
    g = torch.Generator().manual_seed(5)
    out_f, in_f, n = 600, 520, 600
    assert n > 2 * _rows_per_block(out_f, in_f) and n % _rows_per_block(out_f, in_f)
    crow, col, rows = make_mask(out_f, in_f, 400, g)
    x = torch.randn(n, in_f, generator=g)
    W = torch.randn(out_f, in_f, generator=g)
    values = torch.randn(col.numel(), generator=g, requires_grad=True)
    A, B = torch.zeros(0, in_f), torch.zeros(out_f, 0)
    y = op(x, W, None, A, B, 1.0, crow, col, values, None)
    dy = torch.randn(y.shape, generator=g)
    (dvalues,) = torch.autograd.grad(y, [values], dy)
    v64 = values.detach().double().requires_grad_()
    y64 = _dense_reference(W.double(), None, crow, col, rows, v64, x.double(), A.double(), B.double(), 1.0)
    (want,) = torch.autograd.grad(y64, [v64], dy.double())
    assert torch.allclose(dvalues.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("n_rows, builds", [(12, 2), (40, 1)], ids=["rebuilt", "saved"])
def test_backward_reuses_the_forwards_dense_weight(n_rows, builds, monkeypatch):
    """spec.py's forward_saving opt-in: the transient W + S + scale·B·A goes to the backward
    when it is no larger than x, else the backward builds it again; float64 gradients either way."""
    import rosafx.ops.sparse as S_
    built = []
    original = S_._dense_weight
    monkeypatch.setattr(S_, "_dense_weight", lambda *a: built.append(1) or original(*a))
    g = torch.Generator().manual_seed(5)
    out_f, in_f = 29, 37
    crow, col, rows = make_mask(out_f, in_f, 50, g)
    x = torch.randn(n_rows, in_f, generator=g, requires_grad=True)
    W, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
    A = torch.randn(3, in_f, generator=g, requires_grad=True)
    B = torch.randn(out_f, 3, generator=g, requires_grad=True)
    values = torch.randn(col.numel(), generator=g, requires_grad=True)
    y = op(x, W, b, A, B, 0.7, crow, col, values, None)
    dy = torch.randn(y.shape, generator=g)
    inputs = [x, A, B, values]
    grads = torch.autograd.grad(y, inputs, dy)
    assert len(built) == builds
    d = [t.detach().double().requires_grad_() for t in inputs]
    S = torch.zeros(out_f, in_f, dtype=torch.float64).index_put((rows, col), d[3])
    y64 = F.linear(d[0], W.double() + S, b.double()) + 0.7 * (d[0] @ d[1].t()) @ d[2].t()
    for got, want in zip(grads, torch.autograd.grad(y64, d, dy.double())):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))
