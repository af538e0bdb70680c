"""rosafx.kernels.sparse_lowrank_linear under the Triton interpreter on CPU: CSR mask with an
empty row, rank 3 and rank 0, every gradient (dvalues by SDDMM) against float64 torch."""
import pytest
import torch
import torch.nn.functional as F

from kernel_checks import DEVICE, N_IN, N_OUT, RANK, half_error_within_torch_half_error, needs_cuda, randn, rel_err
from rosafx.kernels import sparse_lowrank_linear


def random_csr(n_rows, n_cols, density, gen, empty_row=4):
    """A CSR mask with row ``empty_row`` empty (a sparse row with no entries)."""
    keep = torch.rand(n_rows, n_cols, generator=gen) < density
    keep[empty_row] = False
    keep[0, :3] = True
    dense = torch.where(keep, torch.randn(n_rows, n_cols, generator=gen), torch.zeros(()))
    S = dense.to_sparse_csr()
    return S.crow_indices().to(DEVICE), S.col_indices().to(DEVICE), S.values().to(DEVICE)


def sparse_reference(x, W, b, A, B, scale, S_dense):
    return F.linear(x, W + S_dense, b) + scale * (x @ A.t()) @ B.t()


def dense_of(crow, col, values, shape):
    rows = torch.repeat_interleave(torch.arange(shape[0], device=crow.device), crow.diff())
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_put((rows, col), values)


@pytest.mark.parametrize("rank", [RANK, 0])
def test_sparse_forward_and_gradients_match_float64(rank):
    g = torch.Generator().manual_seed(0)
    crow, col, values = random_csr(N_OUT, N_IN, 0.1, g)
    assert (crow.diff() == 0).any()
    values = values.float().requires_grad_()
    x = randn(3, 5, N_IN, gen=g)
    W, b = randn(N_OUT, N_IN, gen=g, grad=False), randn(N_OUT, gen=g, grad=False)
    A, B = randn(rank, N_IN, gen=g), randn(N_OUT, rank, gen=g)
    y = sparse_lowrank_linear(x, W, b, A, B, 0.7, crow, col, values)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(y, [x, A, B, values], dy)
    x64, W64, b64, A64, B64, v64 = [t.detach().double().requires_grad_() for t in (x, W, b, A, B, values)]
    y64 = sparse_reference(x64, W64, b64, A64, B64, 0.7, dense_of(crow, col, v64, (N_OUT, N_IN)))
    grads64 = torch.autograd.grad(y64, [x64, A64, B64, v64], dy.double(), allow_unused=True)
    assert rel_err(y, y64) < 1e-4
    for name, got, want in zip(("dx", "dA", "dB", "dvalues"), grads, grads64):
        if got.numel():
            assert rel_err(got, want) < 1e-4, name


def test_sparse_registered_twin_gives_every_gradient_with_separate_input():
    import rosafx.kernels  # noqa: F401  (registers the Triton implementations)
    g = torch.Generator().manual_seed(2)
    crow, col, values = random_csr(N_OUT, N_IN, 0.15, g, empty_row=7)
    values = values.float().requires_grad_()
    x, x_a = randn(3, 5, N_IN, gen=g), randn(3, 5, N_IN, gen=g)
    W, b = randn(N_OUT, N_IN, gen=g), randn(N_OUT, gen=g)
    A, B = randn(RANK, N_IN, gen=g), randn(N_OUT, RANK, gen=g)
    inputs = [x, W, b, A, B, values, x_a]
    y = torch.ops.rosafx.sparse_lowrank_linear_triton.default(x, W, b, A, B, 1.3, crow, col, values, x_a)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(y, inputs, dy)
    x64, W64, b64, A64, B64, v64, xa64 = d64 = [t.detach().double().requires_grad_() for t in inputs]
    y64 = F.linear(x64, W64 + dense_of(crow, col, v64, (N_OUT, N_IN)), b64) + 1.3 * (xa64 @ A64.t()) @ B64.t()
    grads64 = torch.autograd.grad(y64, d64, dy.double())
    assert rel_err(y, y64) < 1e-4
    for name, got, want in zip(("dx", "dW", "db", "dA", "dB", "dvalues", "dx_a"), grads, grads64):
        assert rel_err(got, want) < 1e-4, name


def test_dense_route_gives_the_csr_kernels_results(monkeypatch):
    """The GPU's dense route (S scattered into a transient, cuBLAS products) forced on here,
    against float64: forward and every gradient, an empty sparse row included."""
    import importlib
    sparse_kernels = importlib.import_module("rosafx.kernels.sparse_lowrank_linear")   # the module, not the function
    monkeypatch.setattr(sparse_kernels, "dense_route", lambda x, values, weight: True)
    g = torch.Generator().manual_seed(3)
    crow, col, values = random_csr(N_OUT, N_IN, 0.2, g)
    x, W, b = randn(3, 5, N_IN, gen=g), randn(N_OUT, N_IN, gen=g), randn(N_OUT, gen=g)
    A, B = randn(RANK, N_IN, gen=g), randn(N_OUT, RANK, gen=g)
    values = values.requires_grad_()
    inputs = [x, W, b, A, B, values]
    y = sparse_lowrank_linear(x, W, b, A, B, 0.7, crow, col, values)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(y, [x, A, B, values], dy)
    x64, W64, b64, A64, B64, v64 = [t.detach().double().requires_grad_() for t in inputs]
    y64 = sparse_reference(x64, W64, b64, A64, B64, 0.7, dense_of(crow, col, v64, (N_OUT, N_IN)))
    grads64 = torch.autograd.grad(y64, [x64, A64, B64, v64], dy.double())
    assert rel_err(y, y64) < 1e-4
    for name, got, want in zip(("dx", "dA", "dB", "dvalues"), grads, grads64):
        assert rel_err(got, want) < 1e-4, name


def test_sparse_rejects_csr_of_wrong_height():
    g = torch.Generator().manual_seed(0)
    crow, col, values = random_csr(N_OUT - 1, N_IN, 0.1, g)
    x, W = randn(4, N_IN, gen=g), randn(N_OUT, N_IN, gen=g, grad=False)
    with pytest.raises(ValueError, match="row pointers"):
        sparse_lowrank_linear(x, W, None, randn(0, N_IN, gen=g), randn(N_OUT, 0, gen=g), 1.0, crow, col, values)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_half_precision_error_within_torch_half_error(dtype):
    g = torch.Generator().manual_seed(0)
    n_in, n_out, rank = 515, 517, 16
    crow, col, values = random_csr(n_out, n_in, 0.02, g)
    values = (values * 0.05).to(dtype).requires_grad_()
    x = randn(8, 33, n_in, gen=g, dtype=dtype)
    W = randn(n_out, n_in, gen=g, dtype=dtype, grad=False) * 0.05
    A, B = (randn(*shape, gen=g, dtype=dtype, grad=False).mul_(0.05).requires_grad_()
            for shape in ((rank, n_in), (n_out, rank)))

    def reference(x, W, b, A, B, scale, crow, col, values):
        return sparse_reference(x, W, b, A, B, scale, dense_of(crow, col, values, W.shape))

    half_error_within_torch_half_error(sparse_lowrank_linear, reference,
                                       [x, W, None, A, B, 2.0, crow, col, values], wrt=[0, 3, 4, 8])
