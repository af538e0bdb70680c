"""passes/fuse_siblings.py: the fused graph against the unfused one in float64 (outputs and
every gradient), on a model whose q, k, v and gate, up read one input each; merge, save
(rosafx and PEFT formats) and calibration of a fused graph; what is left unfused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rosafx
from rosafx.passes.fuse_siblings import FUSED, fuse_siblings, sibling_groups
from rosafx.graph.adapted_graph import adapters_of

from invariants import perturb, rel_err, run
from models import main_output, tiny_llama

ops = torch.ops.rosafx


class Siblings(nn.Module):
    """q, k, v read x (v narrower); gate and up read the attention output; one lone site."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 6)
        self.gate, self.up = nn.Linear(12, 20, bias=False), nn.Linear(12, 20, bias=False)
        self.down = nn.Linear(20, 12)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ torch.cat([v, v], -1) + x
        return self.down(torch.nn.functional.silu(self.gate(a)) * self.up(a))


LORA = {"method": "lora", "rank": 3, "alpha": 6}
VERA = {"method": "vera", "rank": 5, "d_initial": 0.1}
RULES = {r"q|k|v|gate|up|down": LORA}


def build(config, dtype=torch.float64):
    torch.manual_seed(0)
    model = Siblings().to(dtype).eval()
    x = torch.randn(2, 7, 12, dtype=dtype)
    adapted = rosafx.transform(model, {r"q|k|v|gate|up|down": config}, example_inputs=(x,))
    adapted.to(dtype)  # adapters are built in fp32: the float64 reference needs them in float64 too
    perturb(adapted, std=0.3)
    return adapted, x


def outputs_and_grads(adapted, x):
    x = x.clone().requires_grad_()
    y = adapted(x)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()
    names = sorted(n for n, p in adapted.named_parameters() if p.requires_grad)
    params = dict(adapted.named_parameters())
    grads = torch.autograd.grad(loss, [x] + [params[n] for n in names])
    return y.detach(), dict(zip(["x"] + names, grads))


@pytest.mark.parametrize("config", [LORA, VERA], ids=["lora", "vera"])
def test_fused_equals_unfused_in_float64(config):
    adapted, x = build(config)
    want_y, want_grads = outputs_and_grads(adapted, x)
    fused = fuse_siblings(adapted)
    targets = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    if config is LORA:
        assert targets.count(ops.lowrank_down_stacked.default) == 2       # (q, k, v) and (gate, up)
        assert targets.count(ops.lowrank_linear_given_h.default) == 5
        assert targets.count(ops.lowrank_linear.default) == 1            # down reads its own input
    else:
        # q, k, v share A[:, :12]; gate, up share it on another input; v (out 6) slices B differently
        assert targets.count(ops.vera_project.default) == 2
        assert targets.count(ops.vera_linear_given_h.default) == 5
    got_y, got_grads = outputs_and_grads(fused, x)
    assert rel_err(got_y, want_y) < 1e-12
    assert set(got_grads) == set(want_grads)
    for name, want in want_grads.items():
        assert rel_err(got_grads[name], want) < 1e-12, name


def test_lora_fused_gradients_match_unfused_on_llama():
    """Real HF graph: q, k (narrow), v (narrow) and gate, up; float32 outputs and gradients."""
    rules = {r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)": LORA}
    results = []
    for fuse in (False, True):
        model, _ = tiny_llama()
        adapted = rosafx.transform(model, rules)
        perturb(adapted)
        if fuse:
            fuse_siblings(adapted)
            assert len([n for n in adapted.graph.nodes if n.meta.get(FUSED)
                        and n.target is ops.lowrank_down_stacked.default]) == 4   # 2 layers x 2 groups
        ids = adapted.meta["rosafx"]["example_inputs"][1]["input_ids"]
        y = main_output(adapted(ids))
        y.pow(2).mean().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}))
    (y0, grads0), (y1, grads1) = results
    assert rel_err(y1, y0) < 1e-5
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert rel_err(grads1[name], grads0[name]) < 1e-4, name


@pytest.mark.parametrize("config", [LORA, VERA], ids=["lora", "vera"])
def test_merge_and_save_of_a_fused_graph_are_the_unfused_ones(config, tmp_path):
    adapted, x = build(config, torch.float32)
    merged_before = rosafx.merge(adapted)
    rosafx.save(adapted, tmp_path / "unfused")
    rosafx.save(adapted, tmp_path / "unfused_peft", format="peft")
    fuse_siblings(adapted)
    merged = rosafx.merge(adapted)
    assert not any(n.meta.get(FUSED) for n in merged.graph.nodes)
    assert [n.format_node() for n in merged.graph.nodes] == [n.format_node() for n in merged_before.graph.nodes]
    assert rel_err(run(merged, (x,)), run(merged_before, (x,))) == 0.0
    rosafx.save(adapted, tmp_path / "fused")
    rosafx.save(adapted, tmp_path / "fused_peft", format="peft")
    for a, b in (("unfused", "fused"), ("unfused_peft", "fused_peft")):
        files = sorted(p.name for p in (tmp_path / a).iterdir())
        assert files == sorted(p.name for p in (tmp_path / b).iterdir())
        for name in files:
            assert (tmp_path / a / name).read_bytes() == (tmp_path / b / name).read_bytes(), name
    torch.manual_seed(0)
    loaded = rosafx.load(Siblings().eval(), tmp_path / "fused", example_inputs=(x,))
    assert rel_err(run(loaded, (x,)), run(adapted, (x,))) < 1e-6


def test_rosa_robust_and_dropout_sites_stay_unfused():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12)
    adapted = rosafx.transform(Siblings().eval(), {r"q|k": {**LORA, "dropout": 0.1},
                                                   r"gate|up": {"method": "rosa-robust", "rank": 2}},
                               example_inputs=(x,))
    assert sibling_groups(adapted) == []


def test_calibration_reads_a_fused_graph():
    """lora-ga calibrates through the site ops' dW: fused before calibrate gives the same init."""
    states = []
    for fuse in (False, True):
        torch.manual_seed(0)
        x = torch.randn(2, 7, 12)
        adapted = rosafx.transform(Siblings().eval(), {r"q|k|v": {"method": "lora-ga", "rank": 2}},
                                   example_inputs=(x,))
        if fuse:
            fuse_siblings(adapted)
        rosafx.calibrate(adapted, [(x,)] * 2, lambda m, b: m(*b).pow(2).mean(), progress=False)
        states.append({k: v.clone() for a in adapters_of(adapted).values() for k, v in a.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=1e-5), k
