"""rosafx::lowrank_linear against float64 torch autograd, and torch.library's own checks."""
import pytest
import torch
import torch.nn.functional as F

import rosafx  # noqa: F401  (registers the op)

op = torch.ops.rosafx.lowrank_linear.default


def reference(x, W, b, A, B, scale, x_a=None):
    a_in = x if x_a is None else x_a
    return F.linear(x, W, b) + scale * (a_in @ A.t()) @ B.t()


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("separate_input", [False, True])
def test_forward_and_gradients_match_float64(with_bias, separate_input):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 37, generator=g, requires_grad=True)
    W = torch.randn(29, 37, generator=g, requires_grad=True)
    b = torch.randn(29, generator=g, requires_grad=True) if with_bias else None
    A = torch.randn(3, 37, generator=g, requires_grad=True)
    B = torch.randn(29, 3, generator=g, requires_grad=True)
    x_a = torch.randn(3, 5, 37, generator=g, requires_grad=True) if separate_input else None
    inputs = [t for t in (x, W, b, A, B, x_a) if t is not None]
    y = op(x, W, b, A, B, 0.7, x_a)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, inputs, dy)
    d64 = [t.detach().double().requires_grad_() for t in inputs]
    it = iter(d64)
    x64, W64 = next(it), next(it)
    b64 = next(it) if with_bias else None
    A64, B64 = next(it), next(it)
    xa64 = next(it) if separate_input else None
    y64 = reference(x64, W64, b64, A64, B64, 0.7, xa64)
    grads64 = torch.autograd.grad(y64, d64, dy.double())
    assert torch.allclose(y.double(), y64, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, grads64):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("n_rows, builds", [(15, 0), (20, 2), (64, 1)],
                         ids=["update-added", "merged-rebuilt", "merged-saved"])
def test_both_routes_match_float64(n_rows, builds, monkeypatch):
    """Forward and dx through W + scale·B·A (enough rows for the merge to pay) and through
    y += scale·h·Bᵀ (too few rows) both equal float64 autograd. The merged weight is built
    once and saved for the backward when it is no larger than x, else built again there."""
    import rosafx.ops.lowrank as L
    from rosafx.ops import spec
    built = []
    original = L._merged_weight
    monkeypatch.setattr(L, "_merged_weight", lambda *a: built.append(1) or original(*a))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n_rows, 37, generator=g, requires_grad=True)
    W = torch.randn(29, 37, generator=g, requires_grad=True)
    b = torch.randn(29, generator=g, requires_grad=True)
    A = torch.randn(4, 37, generator=g, requires_grad=True)
    B = torch.randn(29, 4, generator=g, requires_grad=True)
    assert L._merge_pays(x, W, A, B, None) == (n_rows >= 20)
    inputs = [x, W, b, A, B]
    y = op(x, W, b, A, B, 0.3, None)
    assert spec._HANDOFF.output is None
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, inputs, dy)
    assert len(built) == builds
    d64 = [t.detach().double().requires_grad_() for t in inputs]
    y64 = reference(*d64, 0.3)
    grads64 = torch.autograd.grad(y64, d64, dy.double())
    assert torch.allclose(y.double(), y64, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, grads64):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_half_base_with_fp32_adapter():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, generator=g).to(torch.bfloat16)
    W = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    A, B = torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
    y = op(x, W, None, A, B, 1.0, None)
    assert y.dtype == torch.bfloat16
    want = reference(x.double(), W.double(), None, A.double(), B.double(), 1.0)
    assert torch.allclose(y.double(), want, rtol=2e-2, atol=5e-2)


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 3, 8, generator=g, requires_grad=True), torch.randn(5, 8, generator=g),
            torch.randn(5, generator=g), torch.randn(2, 8, generator=g, requires_grad=True),
            torch.randn(5, 2, generator=g, requires_grad=True), 0.5, None)
    torch.library.opcheck(op, args)
