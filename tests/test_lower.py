"""rosafx.lower: a whole adapted model on the Triton backend (interpreter on CPU, the GPU
when there is one) gives the torch reference backend's outputs and gradients; the graph stays
mergeable and reversible."""
import pytest
import torch

import rosafx
from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapter_nodes, adapters_of

from invariants import perturb
from kernel_checks import DEVICE
from models import ZOO, main_output, other_inputs as cpu_inputs

ops = torch.ops.rosafx
CASES = {"bert": ("query", "lowrank_linear"), "gpt2": ("c_attn", "lowrank_linear")}


def on_device(zoo_name):
    """A zoo model on the kernels' device, captured there (the graph keeps its device)."""
    model, example = ZOO[zoo_name]()
    return model.to(DEVICE), example


def other_inputs(model, example):
    return tuple(t.to(DEVICE) for t in cpu_inputs(model, example))


def adapted_model(zoo_name, method="lora"):
    model, example = on_device(zoo_name)
    pattern, _ = CASES[zoo_name]
    adapted = rosafx.transform(model, {pattern: {"method": method, "rank": 3}}, example_inputs=example)
    perturb(adapted)
    return model, adapted, other_inputs(model, example)


def outputs_and_grads(adapted, inputs):
    params = [p for p in adapted.parameters() if p.requires_grad]
    out = main_output(adapted(*inputs))
    loss = (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum()
    return out.detach(), torch.autograd.grad(loss, params)


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def rosa_robust_bert():
    """rosa-robust after calibration: sparse masks (some rows empty) plus rank 2."""
    model, example = on_device("bert")
    rule = {"method": "rosa-robust", "rank": 2, "alpha": 4, "density": 0.05}
    adapted = rosafx.transform(model, {"query": rule, "value": rule}, example_inputs=example)
    inputs = other_inputs(model, example)
    rosafx.calibrate(adapted, [inputs], lambda m, batch: main_output(m(*batch))[..., :2].pow(2).mean(),
                     progress=False)
    perturb(adapted)
    adapters = adapters_of(adapted).values()
    assert all(a.sparse_values.numel() > 0 for a in adapters)
    assert any((a.crow_indices.diff() == 0).any() for a in adapters)     # an empty sparse row
    return model, adapted, inputs


def vera_bert():
    """VeRA on 32 -> 32 (query), 32 -> 48 (intermediate) and 48 -> 32 (output) sites: the
    shared pair is sized for the largest in and out, so every site reads a strict slice of A or B."""
    model, example = on_device("bert")
    rule = {"method": "vera", "rank": 3, "d_initial": 0.1}
    rules = {"query": rule, "intermediate.dense": rule, r".*layer\.\d+\.output\.dense": rule}
    adapted = rosafx.transform(model, rules, example_inputs=example)
    perturb(adapted)
    return model, adapted, other_inputs(model, example)


# case -> (builder, the reference op its adapter nodes call)
MODEL_CASES = {
    "bert": (lambda: adapted_model("bert"), "lowrank_linear"),
    "gpt2": (lambda: adapted_model("gpt2"), "lowrank_linear"),
    "rosa_robust_bert": (rosa_robust_bert, "sparse_lowrank_linear"),
    "vera_bert": (vera_bert, "vera_linear"),
}


VERA_MISSING = pytest.mark.skipif("vera" not in rosafx.methods(), reason="the vera method is not registered")


@pytest.mark.parametrize("case", [pytest.param(c, marks=VERA_MISSING) if c.startswith("vera") else c
                                  for c in sorted(MODEL_CASES)])
def test_triton_backend_matches_torch_backend(case):
    build, op_name = MODEL_CASES[case]
    _, adapted, inputs = build()
    want_out, want_grads = outputs_and_grads(adapted, inputs)
    lowered = rosafx.lower(adapted, backend="triton")
    targets = {n.target for n in adapter_nodes(lowered)}
    assert targets == {getattr(ops, op_name + "_triton").default}
    got_out, got_grads = outputs_and_grads(lowered, inputs)
    assert rel_err(got_out, want_out) < 1e-4
    assert len(got_grads) == len(want_grads) > 0
    for got, want in zip(got_grads, want_grads):
        assert rel_err(got, want) < 1e-4


def test_training_mode_with_adapter_dropout_matches_torch_backend():
    """x_a = dropout(x) feeds the op: same RNG seed, same mask, so the backends must agree."""
    model, example = on_device("bert")
    adapted = rosafx.transform(model, {"query": {"method": "lora", "rank": 3, "dropout": 0.3}}, example_inputs=example)
    perturb(adapted)
    adapted.train()
    inputs = other_inputs(model, example)
    torch.manual_seed(5)
    want_out, want_grads = outputs_and_grads(adapted, inputs)
    rosafx.lower(adapted, backend="triton")
    torch.manual_seed(5)
    got_out, got_grads = outputs_and_grads(adapted, inputs)
    assert rel_err(got_out, want_out) < 1e-4
    for got, want in zip(got_grads, want_grads):
        assert rel_err(got, want) < 1e-4


def test_triton_without_cuda_or_interpreter_is_a_user_error(monkeypatch):
    _, adapted, _ = adapted_model("bert")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RosafxError, match="TRITON_INTERPRET"):
        rosafx.lower(adapted, backend="triton")


def test_lowered_graph_merges_and_lowers_back():
    _, adapted, inputs = adapted_model("bert")
    want = main_output(rosafx.merge(adapted)(*inputs))
    lowered = rosafx.lower(adapted, backend="triton")
    assert rel_err(main_output(rosafx.merge(lowered)(*inputs)), want) < 1e-5
    back = rosafx.lower(lowered, backend="torch")
    assert {n.target for n in adapter_nodes(back)} == {ops.lowrank_linear.default}


def test_auto_picks_triton_for_cuda_tensors_and_torch_for_cpu_tensors():
    _, adapted, _ = adapted_model("bert")
    lowered = rosafx.lower(adapted, backend="auto")      # adapter tensors sit on DEVICE
    want = ops.lowrank_linear_triton if DEVICE == "cuda" else ops.lowrank_linear
    assert {n.target for n in adapter_nodes(lowered)} == {want.default}


def test_unknown_backend_is_a_user_error():
    _, adapted, _ = adapted_model("bert")
    with pytest.raises(RosafxError, match="Unknown backend"):
        rosafx.lower(adapted, backend="cuda")


@pytest.mark.parametrize("case", ["bert", "rosa_robust_bert"])
def test_compiled_lowered_graph_gives_the_eager_outputs_and_gradients(case):
    """torch.compile keeps the Triton backward whole (rosafx::<op>_triton_backward): a
    kernel launch cannot be traced on fake tensors, which failed before."""
    build, _ = MODEL_CASES[case]
    _, adapted, inputs = build()
    lowered = rosafx.lower(adapted, backend="triton")
    want_out, want_grads = outputs_and_grads(lowered, inputs)
    got_out, got_grads = outputs_and_grads(torch.compile(lowered, backend="aot_eager"), inputs)
    assert rel_err(got_out, want_out) < 1e-6
    for got, want in zip(got_grads, want_grads):
        assert rel_err(got, want) < 1e-6
