"""rosafx.kernels.vera_linear under the Triton interpreter on CPU: shared A, B larger than the
site (read as slices), every gradient against float64 torch."""
import pytest
import torch
import torch.nn.functional as F

from kernel_checks import DEVICE, N_IN, N_OUT, RANK, half_error_within_torch_half_error, needs_cuda, randn, rel_err
from rosafx.kernels import vera_linear


def vera_reference(x, W, bias, A_shared, B_shared, d, b, x_a=None):
    A, B = A_shared[:, : W.shape[1]], B_shared[: W.shape[0], :]
    return F.linear(x, W, bias) + b * ((d * ((x if x_a is None else x_a) @ A.t())) @ B.t())


def test_vera_forward_and_gradients_match_float64():
    """Shared A, B larger than the site (41 > 37 inputs, 33 > 29 outputs): the kernel reads slices."""
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
    import rosafx.kernels  # noqa: F401  (registers the Triton implementations)
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
    g = torch.Generator().manual_seed(0)
    x, W = randn(4, N_IN, gen=g), randn(N_OUT, N_IN, gen=g, grad=False)
    with pytest.raises(ValueError, match="do not fit"):
        vera_linear(x, W, None, randn(RANK, N_IN - 1, gen=g), randn(N_OUT, RANK, gen=g),
                    randn(RANK, gen=g), randn(N_OUT, gen=g))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vera_half_precision_error_within_torch_half_error(dtype):
    g = torch.Generator().manual_seed(0)
    n_in, n_out, rank = 515, 517, 16
    x = randn(8, 33, n_in, gen=g, dtype=dtype)
    W = randn(n_out, n_in, gen=g, dtype=dtype, grad=False) * 0.05
    A, B = (randn(*shape, gen=g, dtype=dtype, grad=False) * 0.05 for shape in ((rank, n_in + 4), (n_out + 4, rank)))
    d, b = (randn(n, gen=g, dtype=dtype, grad=False).mul_(0.5).requires_grad_() for n in (rank, n_out))
    half_error_within_torch_half_error(vera_linear, vera_reference, [x, W, None, A, B, d, b], wrt=[0, 5, 6])
