"""Helpers shared by the Triton kernel tests: inputs on the kernels' device, error measure."""
import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision Triton needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_IN, N_OUT, RANK = 37, 29, 3          # no block size divides these


def rel_err(got, want):
    """max abs error relative to the reference's largest magnitude."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def randn(*shape, gen, dtype=torch.float32, grad=True):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_(grad)


def float64_copies(tensors):
    return [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
