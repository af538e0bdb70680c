"""rosafx.kernels.lowrank_linear (and the shared strided matmul) under the Triton interpreter
on CPU, against float64 torch autograd on odd shapes; half precision against torch's own
half error (GPU only)."""
import pytest
import torch
import torch.nn.functional as F

from kernel_checks import DEVICE, N_IN, N_OUT, RANK, half_error_within_torch_half_error, needs_cuda, randn, rel_err
from rosafx.kernels import lowrank_linear
from rosafx.kernels.matmul import matmul


def test_matmul_strided_views_and_accumulate():
    g = torch.Generator().manual_seed(0)
    a, b = randn(21, 37, gen=g, grad=False), randn(29, 37, gen=g, grad=False)
    assert rel_err(matmul(a, b.t()), a.double() @ b.double().t()) < 1e-5
    c = randn(21, 29, gen=g, grad=False)
    want = c.double() + 0.5 * a.double() @ b.double().t()
    matmul(a, b.t(), alpha=0.5, out=c, accumulate=True)
    assert rel_err(c, want) < 1e-5


@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_split_along_k_matches_float64(accumulate):
    """A thin product over a long K (dA = gᵀ·x over the tokens) is split along K with
    atomic fp32 partials; alpha and the column vector apply to every partial."""
    from rosafx.kernels.matmul import launch_shape
    g = torch.Generator().manual_seed(2)
    a, b = randn(1200, 5, gen=g, grad=False).t(), randn(1200, 37, gen=g, grad=False)   # 5 x 1200 by 1200 x 37
    assert launch_shape(5, 37, 1200)[3] > 1
    col = randn(37, gen=g, grad=False)
    c = randn(5, 37, gen=g, grad=False)
    want = (c.double() if accumulate else 0) + 0.5 * (a.double() @ b.double()) * col.double()
    got = matmul(a, b, alpha=0.5, out=c, accumulate=accumulate, col_scale=col)
    assert got is c and rel_err(c, want) < 1e-5


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
    import rosafx.kernels  # noqa: F401  (registers the Triton implementations)
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
    n_in, n_out, rank = 515, 517, 16
    x = randn(8, 33, n_in, gen=g, dtype=dtype)
    W = randn(n_out, n_in, gen=g, dtype=dtype, grad=False) * 0.05
    A, B = (randn(*shape, gen=g, dtype=dtype, grad=False).mul_(0.05).requires_grad_()
            for shape in ((rank, n_in), (n_out, rank)))
    half_error_within_torch_half_error(lowrank_linear, lowrank_reference, [x, W, None, A, B, 2.0], wrt=[0, 3, 4])
