"""Site forms beyond aten.linear/addmm: Falcon's x @ W.T (+ bias add), x @ W, mm, bmm over a
broadcast weight, einsum over a parameter. References: the user's eager model with
W + ΔW computed in float64 outside rosafx, and the unadapted model."""
import copy

import pytest
import torch
from torch import nn

import rosafx
from rosafx.graph.capture import capture
from rosafx.graph.adapted_graph import adapters_of
from rosafx.passes.bank import site_grad
from rosafx.graph.sites import find_sites

from models import VOCAB, main_output

LORA = {"method": "lora", "rank": 2, "alpha": 4}


class HandWritten(nn.Module):
    """One weight per form; b and d are stored in x out."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(24, 16) * 0.2)   # x @ a.T + bias
        self.bias = nn.Parameter(torch.randn(24) * 0.1)
        self.b = nn.Parameter(torch.randn(24, 24) * 0.2)   # x @ b
        self.c = nn.Parameter(torch.randn(20, 24) * 0.2)   # einsum "bsi,oi->bso"
        self.d = nn.Parameter(torch.randn(20, 12) * 0.2)   # einsum "...i,io->...o"
        self.e = nn.Parameter(torch.randn(12, 12) * 0.2)   # mm with permute(1, 0)
        self.f = nn.Parameter(torch.randn(8, 12) * 0.2)    # bmm over f.t().expand(B, ...)

    def forward(self, x):
        h = torch.tanh(x @ self.a.T + self.bias)
        h = torch.tanh(torch.matmul(h, self.b))
        h = torch.einsum("bsi,oi->bso", h, self.c)
        h = torch.einsum("...i,io->...o", h, self.d)
        batch, seq, dim = h.shape
        h = torch.mm(h.reshape(-1, dim), self.e.permute(1, 0)).reshape(batch, seq, dim)
        return torch.bmm(h, self.f.t().expand(batch, -1, -1))


EXPECTED = {"a": ("matmul", False), "b": ("matmul", True), "c": ("einsum", False), "d": ("einsum", True),
            "e": ("mm", False), "f": ("bmm", False)}


def tiny_falcon():
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(0)
    config = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=True)
    return FalconForCausalLM(config).eval()


def randomize(adapted):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in adapters_of(adapted).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.1)


def reference_with_deltas(model, adapted):
    """The user's eager model with each site's W + s·B·A (float64, in W's stored layout)."""
    ref = copy.deepcopy(model).double()
    stored_in_out = {p for p, s in adapted.meta["rosafx"]["sites"].items() if s["stored_in_out"]}
    for path, site in adapted.meta["rosafx"]["sites"].items():
        adapter = adapters_of(adapted)[path]
        delta = adapter.scale * adapter.lora_B.detach().double() @ adapter.lora_A.detach().double()
        weight = ref.get_parameter(site["weight_name"])
        with torch.no_grad():
            weight.add_(delta.t() if path in stored_in_out else delta)
    return ref


@pytest.fixture(scope="module")
def hand_written():
    torch.manual_seed(0)
    model, x = HandWritten().eval(), torch.randn(3, 5, 16)
    adapted = rosafx.transform(model, {".*": LORA}, example_inputs=(x,))
    randomize(adapted)
    return model, x, adapted


def test_every_hand_written_form_is_a_site_with_its_layout(hand_written):
    model, x, _ = hand_written
    gm, _, _ = capture(model, (x,))
    found = {s.path: (s.form, s.stored_in_out) for s in find_sites(gm)}
    assert found == EXPECTED
    shapes = {s.path: (s.out_features, s.in_features) for s in find_sites(gm)}
    assert shapes["b"] == (24, 24) and shapes["d"] == (12, 20) and shapes["f"] == (8, 12)


def test_hand_written_forms_adapt_and_merge_exactly(hand_written):
    model, x, adapted = hand_written
    x2 = torch.randn(2, 4, 16)
    ref = reference_with_deltas(model, adapted)
    with torch.no_grad():
        want = ref(x2.double()).float()
        got = adapted(x2)
        merged = rosafx.merge(adapted)
        got_merged = merged(x2)
    assert (got - want).abs().max() < 1e-5
    assert (got_merged - want).abs().max() < 1e-5
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    targets = {n.target for n in merged.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.einsum.default in targets and torch.ops.aten.mm.default in targets


def test_hand_written_forms_train(hand_written):
    model, x, _ = hand_written
    adapted = rosafx.transform(model, {".*": LORA}, example_inputs=(x,))
    adapted.train()
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    adapted(x).square().mean().backward()
    grads = [site_grad(adapted, a, "lora_B") for a in adapters_of(adapted).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    opt.step()


@pytest.fixture(scope="module")
def falcon():
    model = tiny_falcon()
    adapted = rosafx.transform(model, {"query_key_value": LORA, "dense": LORA, "dense_h_to_4h": LORA})
    return model, adapted


def test_falcon_linears_are_sites(falcon):
    model, adapted = falcon
    sites = adapted.meta["rosafx"]["sites"]
    assert len(sites) == 6  # qkv, dense, dense_h_to_4h in two layers
    ids = torch.randint(0, VOCAB, (3, 5))
    with torch.no_grad():
        assert (main_output(adapted(ids)) - model(ids).logits).abs().max() < 1e-5  # B = 0: identity


def test_falcon_merge_matches_float64_reference_and_onnx(falcon, tmp_path):
    model, adapted = falcon
    randomize(adapted)
    ids = torch.randint(0, VOCAB, (3, 5))
    with torch.no_grad():
        want = reference_with_deltas(model, adapted)(ids).logits.float()
        got = main_output(adapted(ids))
    assert (got - want).abs().max() < 1e-4
    report = rosafx.export_onnx(adapted, tmp_path / "falcon.onnx", compare_base=False, latency_repeats=0)
    assert report.max_abs_error < 1e-4
