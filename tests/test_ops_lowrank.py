"""rosafx::lowrank_linear against float64 torch autograd, and torch.library's own checks.

The op routes each call (rosafx/ops/lowrank.py, ``choose_route``): small sites run as aten
ops (merged or unmerged composite), larger ones as the opaque custom op
``rosafx::lowrank_linear_opaque``. Every route is checked against float64 autograd."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import rosafx  # noqa: F401  (registers the op)
import rosafx.ops.lowrank as L

op = torch.ops.rosafx.lowrank_linear.default
opaque = torch.ops.rosafx.lowrank_linear_opaque.default


def reference(x, W, b, A, B, scale, x_a=None):
    a_in = x if x_a is None else x_a
    return F.linear(x, W, b) + scale * (a_in @ A.t()) @ B.t()


class OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("route", ["composite", "opaque"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("separate_input", [False, True])
def test_forward_and_gradients_match_float64(with_bias, separate_input, route, monkeypatch):
    """y and every gradient (x, W, b, A, B, x_a) on both routes: the composite (merged when
    the adapter reads x, unmerged with its own input) and the opaque op (forced by a limit
    no site fits)."""
    if route == "opaque":
        monkeypatch.setattr(L, "COMPOSITE_MACS", -1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 37, generator=g, requires_grad=True)
    W = torch.randn(29, 37, generator=g, requires_grad=True)
    b = torch.randn(29, generator=g, requires_grad=True) if with_bias else None
    A = torch.randn(3, 37, generator=g, requires_grad=True)
    B = torch.randn(29, 3, generator=g, requires_grad=True)
    x_a = torch.randn(3, 5, 37, generator=g, requires_grad=True) if separate_input else None
    inputs = [t for t in (x, W, b, A, B, x_a) if t is not None]
    with OpsSeen() as seen:
        y = op(x, W, b, A, B, 0.7, x_a)
        dy = torch.randn(y.shape, generator=g)
        grads = torch.autograd.grad(y, inputs, dy)
    assert (seen.ops["rosafx.lowrank_linear_opaque"] == 1) == (route == "opaque")
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
    y = opaque(x, W, b, A, B, 0.3, None)
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


@pytest.mark.parametrize("which", [op, opaque], ids=["routed", "opaque"])
def test_half_base_with_fp32_adapter(which):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, generator=g).to(torch.bfloat16)
    W = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    A, B = torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
    y = which(x, W, None, A, B, 1.0, None)
    assert y.dtype == torch.bfloat16
    want = reference(x.double(), W.double(), None, A.double(), B.double(), 1.0)
    assert torch.allclose(y.double(), want, rtol=2e-2, atol=5e-2)


def test_route_choice_by_shape():
    """Aten ops (merged) for a small site reading x itself; unmerged with its own input or a
    base dtype the adapter does not share; the opaque op once N·in·out passes the limit, and
    under autocast."""
    def site(n, in_f, out_f, base=torch.float32):
        return (torch.randn(n, in_f).to(base), torch.randn(out_f, in_f).to(base), None,
                torch.randn(4, in_f), torch.randn(out_f, 4), 2.0)
    small = site(16, 64, 128)                           # the TinyLlama-shaped bench site
    assert L.choose_route(*small) is L.composite_merged
    assert L.choose_route(*small, small[0].clone()) is L.composite_unmerged
    assert L.choose_route(*site(16, 64, 128, torch.bfloat16)) is L.composite_unmerged
    limit = L.COMPOSITE_MACS
    assert L.choose_route(*site(limit // (64 * 128), 64, 128)) is L.composite_merged
    assert L.choose_route(*site(limit // (64 * 128) + 1, 64, 128)) is None
    assert L.choose_route(*site(2048, 384, 384)) is None  # the MiniLM sites: the merged custom op
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert L.choose_route(*small) is None


def test_one_node_runs_the_chosen_route():
    """The same op node runs aten ops for a small site and the opaque op for a large one."""
    def ops_of(n, in_f, out_f):
        x = torch.randn(n, in_f, requires_grad=True)
        A = torch.randn(4, in_f, requires_grad=True)
        B = torch.randn(out_f, 4, requires_grad=True)
        with OpsSeen() as seen:
            op(x, torch.randn(out_f, in_f), None, A, B, 2.0, None).sum().backward()
        return seen.ops
    assert ops_of(16, 64, 128)["rosafx.lowrank_linear_opaque"] == 0
    assert ops_of(1024, 128, 128)["rosafx.lowrank_linear_opaque"] == 1


@pytest.mark.parametrize("which", [op, opaque], ids=["routed", "opaque"])
def test_opcheck(which):
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 3, 8, generator=g, requires_grad=True), torch.randn(5, 8, generator=g),
            torch.randn(5, generator=g), torch.randn(2, 8, generator=g, requires_grad=True),
            torch.randn(5, 2, generator=g, requires_grad=True), 0.5, None)
    torch.library.opcheck(which, args)
