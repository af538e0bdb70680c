"""Triton kernels (interpreter on CPU) against float64 torch autograd, on odd shapes that
are not multiples of any block size; half precision against torch's own half error (GPU only)."""
import pytest
import torch
import torch.nn.functional as F

from rosafx.kernels import lowrank_linear
from rosafx.kernels.matmul import matmul

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision Triton needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_IN, N_OUT, RANK = 37, 29, 3


def rel_err(got, want):
    """max abs error relative to the reference's largest magnitude."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def randn(*shape, gen, dtype=torch.float32, grad=True):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_(grad)


def test_matmul_strided_views_and_accumulate():
    g = torch.Generator().manual_seed(0)
    a, b = randn(21, 37, gen=g, grad=False), randn(29, 37, gen=g, grad=False)
    assert rel_err(matmul(a, b.t()), a.double() @ b.double().t()) < 1e-5
    c = randn(21, 29, gen=g, grad=False)
    want = c.double() + 0.5 * a.double() @ b.double().t()
    matmul(a, b.t(), alpha=0.5, out=c, accumulate=True)
    assert rel_err(c, want) < 1e-5


# --- lowrank_linear -------------------------------------------------------------------------

def lowrank_reference(x, W, b, A, B, scale):
    return F.linear(x, W, b) + scale * (x @ A.t()) @ B.t()


@pytest.mark.parametrize("with_bias", [True, False])
def test_lowrank_forward_and_gradients_match_float64(with_bias):
    g = torch.Generator().manual_seed(0)
    x = randn(3, 5, N_IN, gen=g)
    W = randn(N_OUT, N_IN, gen=g, grad=False)
    b = randn(N_OUT, gen=g, grad=False) if with_bias else None
    A, B = randn(RANK, N_IN, gen=g), randn(N_OUT, RANK, gen=g)
    y = lowrank_linear(x, W, b, A, B, 0.7)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(y, [x, A, B], dy)
    d64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, W, b, A, B)]
    y64 = lowrank_reference(*d64, 0.7)
    grads64 = torch.autograd.grad(y64, [d64[0], d64[3], d64[4]], dy.double())
    assert rel_err(y, y64) < 1e-4
    for name, got, want in zip(("dx", "dA", "dB"), grads, grads64):
        assert rel_err(got, want) < 1e-4, name


def test_lowrank_registered_twin_gives_reference_op_gradients_with_separate_input():
    """rosafx::lowrank_linear_triton (what lower swaps in) vs rosafx::lowrank_linear, with
    the adapter on its own input x_a and gradients for every tensor incl. W and bias."""
    import rosafx.kernels.ops  # noqa: F401  (registers the Triton op)
    g = torch.Generator().manual_seed(1)
    x, x_a = randn(3, 5, N_IN, gen=g), randn(3, 5, N_IN, gen=g)
    W, b = randn(N_OUT, N_IN, gen=g), randn(N_OUT, gen=g)
    A, B = randn(RANK, N_IN, gen=g), randn(N_OUT, RANK, gen=g)
    inputs = [x, W, b, A, B, x_a]
    y = torch.ops.rosafx.lowrank_linear_triton.default(x, W, b, A, B, 1.3, x_a)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(y, inputs, dy)
    d64 = [t.detach().double().requires_grad_() for t in inputs]
    y64 = F.linear(d64[0], d64[1], d64[2]) + 1.3 * (d64[5] @ d64[3].t()) @ d64[4].t()
    grads64 = torch.autograd.grad(y64, d64, dy.double())
    assert rel_err(y, y64) < 1e-4
    for name, got, want in zip(("dx", "dW", "db", "dA", "dB", "dx_a"), grads, grads64):
        assert rel_err(got, want) < 1e-4, name


def test_lowrank_rejects_mismatched_factors():
    g = torch.Generator().manual_seed(0)
    x, W = randn(4, N_IN, gen=g), randn(N_OUT, N_IN, gen=g, grad=False)
    with pytest.raises(ValueError, match="do not fit"):
        lowrank_linear(x, W, None, randn(RANK, N_IN + 1, gen=g), randn(N_OUT, RANK, gen=g), 1.0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lowrank_half_precision_error_within_torch_half_error(dtype):
    g = torch.Generator().manual_seed(0)
    x = randn(8, 33, 4096 // 8 + 3, gen=g, dtype=dtype)
    n_in = x.shape[-1]
    W = randn(515, n_in, gen=g, dtype=dtype, grad=False) * 0.05
    A, B = randn(16, n_in, gen=g, dtype=dtype) * 0.05, randn(515, 16, gen=g, dtype=dtype) * 0.05
    A, B = A.detach().requires_grad_(), B.detach().requires_grad_()
    y = lowrank_linear(x, W, None, A, B, 2.0)
    dy = torch.randn(y.shape, device=DEVICE, dtype=dtype)
    got = (y, *torch.autograd.grad(y, [x, A, B], dy))
    torch_half = lowrank_reference(x, W, None, A, B, 2.0)
    want_half = (torch_half, *torch.autograd.grad(torch_half, [x, A, B], dy))
    d64 = [t.detach().double().requires_grad_() for t in (x, W, A, B)]
    y64 = lowrank_reference(d64[0], d64[1], None, d64[2], d64[3], 2.0)
    want64 = (y64, *torch.autograd.grad(y64, [d64[0], d64[2], d64[3]], dy.double()))
    for name, mine, theirs, exact in zip(("y", "dx", "dA", "dB"), got, want_half, want64):
        assert rel_err(mine, exact) <= 2 * rel_err(theirs, exact) + 1e-3, name


# --- sparse_lowrank_linear ------------------------------------------------------------------

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
    from rosafx.kernels import sparse_lowrank_linear
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
    import rosafx.kernels.ops  # noqa: F401
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


def test_sparse_rejects_csr_of_wrong_height():
    from rosafx.kernels import sparse_lowrank_linear
    g = torch.Generator().manual_seed(0)
    crow, col, values = random_csr(N_OUT - 1, N_IN, 0.1, g)
    x, W = randn(4, N_IN, gen=g), randn(N_OUT, N_IN, gen=g, grad=False)
    with pytest.raises(ValueError, match="row pointers"):
        sparse_lowrank_linear(x, W, None, randn(0, N_IN, gen=g), randn(N_OUT, 0, gen=g), 1.0, crow, col, values)


# --- vera_linear ----------------------------------------------------------------------------

def vera_reference(x, W, bias, A_shared, B_shared, d, b, x_a=None):
    A, B = A_shared[:, : W.shape[1]], B_shared[: W.shape[0], :]
    return F.linear(x, W, bias) + b * ((d * ((x if x_a is None else x_a) @ A.t())) @ B.t())


def test_vera_forward_and_gradients_match_float64():
    """Shared A, B larger than the site (41 > 37 inputs, 33 > 29 outputs): the kernel reads slices."""
    from rosafx.kernels import vera_linear
    g = torch.Generator().manual_seed(0)
    x = randn(3, 5, N_IN, gen=g)
    W, bias = randn(N_OUT, N_IN, gen=g, grad=False), randn(N_OUT, gen=g, grad=False)
    A, B = randn(RANK, N_IN + 4, gen=g, grad=False), randn(N_OUT + 4, RANK, gen=g, grad=False)
    d, b = randn(RANK, gen=g), randn(N_OUT, gen=g)
    y = vera_linear(x, W, bias, A, B, d, b)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(y, [x, d, b], dy)
    x64, W64, bias64, A64, B64, d64, b64 = [t.detach().double().requires_grad_() for t in (x, W, bias, A, B, d, b)]
    y64 = vera_reference(x64, W64, bias64, A64, B64, d64, b64)
    grads64 = torch.autograd.grad(y64, [x64, d64, b64], dy.double())
    assert rel_err(y, y64) < 1e-4
    for name, got, want in zip(("dx", "dd", "db"), grads, grads64):
        assert rel_err(got, want) < 1e-4, name


def test_vera_registered_twin_gives_every_gradient_with_separate_input():
    import rosafx.kernels.ops  # noqa: F401
    g = torch.Generator().manual_seed(3)
    x, x_a = randn(3, 5, N_IN, gen=g), randn(3, 5, N_IN, gen=g)
    W, bias = randn(N_OUT, N_IN, gen=g), randn(N_OUT, gen=g)
    A, B = randn(RANK, N_IN + 4, gen=g), randn(N_OUT + 4, RANK, gen=g)
    d, b = randn(RANK, gen=g), randn(N_OUT, gen=g)
    inputs = [x, W, bias, A, B, d, b, x_a]
    y = torch.ops.rosafx.vera_linear_triton.default(*inputs)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(y, inputs, dy)
    d64 = [t.detach().double().requires_grad_() for t in inputs]
    y64 = vera_reference(*d64)
    grads64 = torch.autograd.grad(y64, d64, dy.double())
    assert rel_err(y, y64) < 1e-4
    for name, got, want in zip(("dx", "dW", "dbias", "dA", "dB", "dd", "db", "dx_a"), grads, grads64):
        assert rel_err(got, want) < 1e-4, name


def test_vera_rejects_shared_matrices_smaller_than_the_site():
    from rosafx.kernels import vera_linear
    g = torch.Generator().manual_seed(0)
    x, W = randn(4, N_IN, gen=g), randn(N_OUT, N_IN, gen=g, grad=False)
    with pytest.raises(ValueError, match="do not fit"):
        vera_linear(x, W, None, randn(RANK, N_IN - 1, gen=g), randn(N_OUT, RANK, gen=g),
                    randn(RANK, gen=g), randn(N_OUT, gen=g))
