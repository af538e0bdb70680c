"""rosafx.lower: a whole adapted model on the Triton backend (interpreter on CPU) gives the
torch reference backend's outputs and gradients; the graph stays mergeable and reversible."""
import pytest
import torch

import rosafx
from rosafx.errors import RosafxError
from rosafx.passes.insert import adapter_nodes
from tests.invariants import perturb
from tests.models import ZOO, main_output, other_inputs

ops = torch.ops.rosafx
CASES = {"bert": ("query", "lowrank_linear"), "gpt2": ("c_attn", "lowrank_linear")}


def adapted_model(zoo_name, method="lora"):
    model, example = ZOO[zoo_name]()
    pattern, _ = CASES[zoo_name]
    adapted = rosafx.transform(model, {pattern: {"method": method, "rank": 3}}, example_inputs=example)
    perturb(adapted)
    return model, adapted, other_inputs(model, example)


def outputs_and_grads(adapted, inputs):
    params = [p for p in adapted.parameters() if p.requires_grad]
    out = main_output(adapted(*inputs))
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
    return out.detach(), torch.autograd.grad(loss, params)


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("zoo_name", sorted(CASES))
def test_triton_backend_matches_torch_backend(zoo_name):
    _, adapted, inputs = adapted_model(zoo_name)
    want_out, want_grads = outputs_and_grads(adapted, inputs)
    lowered = rosafx.lower(adapted, backend="triton")
    targets = {n.target for n in adapter_nodes(lowered)}
    assert targets == {getattr(ops, CASES[zoo_name][1] + "_triton").default}
    got_out, got_grads = outputs_and_grads(lowered, inputs)
    assert rel_err(got_out, want_out) < 1e-4
    assert len(got_grads) == len(want_grads) > 0
    for got, want in zip(got_grads, want_grads):
        assert rel_err(got, want) < 1e-4


def test_lowered_graph_merges_and_lowers_back():
    _, adapted, inputs = adapted_model("bert")
    want = main_output(rosafx.merge(adapted)(*inputs))
    lowered = rosafx.lower(adapted, backend="triton")
    assert rel_err(main_output(rosafx.merge(lowered)(*inputs)), want) < 1e-5
    back = rosafx.lower(lowered, backend="torch")
    assert {n.target for n in adapter_nodes(back)} == {ops.lowrank_linear.default}


def test_auto_keeps_torch_for_cpu_tensors():
    _, adapted, _ = adapted_model("bert")
    lowered = rosafx.lower(adapted, backend="auto")      # adapter tensors are on the CPU
    assert {n.target for n in adapter_nodes(lowered)} == {ops.lowrank_linear.default}


def test_unknown_backend_is_a_user_error():
    _, adapted, _ = adapted_model("bert")
    with pytest.raises(RosafxError, match="Unknown backend"):
        rosafx.lower(adapted, backend="cuda")
