"""Helpers shared by the Triton kernel tests: inputs on the kernels' device, error measure."""
import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (on a CPU Triton runs only in the interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_IN, N_OUT, RANK = 37, 29, 3          # no block size divides these


def rel_err(got, want):
    """max abs error relative to the reference's largest magnitude."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def randn(*shape, gen, dtype=torch.float32, grad=True):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_(grad)


def float64_copies(tensors):
    return [t.detach().double().requires_grad_() if t is not None else None for t in tensors]


def half_error_within_torch_half_error(kernel, reference, inputs, wrt, seed=0):
    """Run ``kernel`` and the pure-torch ``reference`` on the same half-precision inputs and
    check that the kernel's output and gradients (w.r.t. ``inputs[i] for i in wrt``) are no
    further from the float64 reference than 2x torch's own half-precision error (+1e-3)."""
    y = kernel(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    leaves = [inputs[i] for i in wrt]
    got = (y, *torch.autograd.grad(y, leaves, dy))
    y_half = reference(*inputs)
    torch_half = (y_half, *torch.autograd.grad(y_half, leaves, dy))
    exact_inputs = [t.detach().double().requires_grad_(i in wrt)
                    if isinstance(t, torch.Tensor) and t.is_floating_point() else t for i, t in enumerate(inputs)]
    y64 = reference(*exact_inputs)
    exact = (y64, *torch.autograd.grad(y64, [exact_inputs[i] for i in wrt], dy.double()))
    for k, (mine, theirs, truth) in enumerate(zip(got, torch_half, exact)):
        name = "y" if k == 0 else f"grad of input {wrt[k - 1]}"
        assert rel_err(mine, truth) <= 2 * rel_err(theirs, truth) + 1e-3, name
