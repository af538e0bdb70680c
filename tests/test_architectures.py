"""The architecture matrix (a representative subset of tests/arch_zoo.py; the full sweep is
tests/arch_sweep.py, results in docs/architectures.md): transform -> identity on padded
and other-sized batches -> a train step -> merge against the float64 eager model with
W + ΔW -> generation with the KV cache for decoders (ONNX of every architecture is in the
bench sweep; here only Falcon and grouped Mixtral export, in their own files). Falcon,
grouped Mixtral and eager Mixtral have files of their own (test_site_forms, test_moe_experts,
test_partial)."""
import copy

import pytest
import torch

import rosafx
from rosafx.recipes.generation import greedy, into_model
from rosafx.graph.adapted_graph import adapters_of

from arch_zoo import ARCHS
from models import main_output

LORA = {"method": "lora", "rank": 2, "alpha": 4}
MATRIX = ["gpt2", "llama", "t5", "whisper", "vit"]   # Conv1D, GQA decoder, seq2seq, audio, vision


def out(module, inputs):
    with torch.no_grad():
        return main_output(module(**inputs)).float()


def rel(got, want):
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module", params=MATRIX)
def case(request):
    arch = ARCHS[request.param]()
    # heads tied to the embedding are left out: the reference writes W + ΔW into the shared tensor
    rules = {arch.targets: LORA, "lm_head": None, "proj_out": None}
    adapted = rosafx.transform(arch.model, rules, example_inputs=arch.inputs)
    return request.param, arch, adapted


def test_identity_on_padded_and_other_sized_batches(case):
    _, arch, adapted = case
    for inputs in (arch.inputs, arch.other_inputs()):
        assert rel(out(adapted, inputs), out(arch.model, inputs)) < 1e-6


def test_train_step_then_merge_matches_float64_reference(case):
    _, arch, adapted = case
    adapted.train()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    main_output(adapted(**arch.inputs)).float().square().mean().backward()
    optimizer.step()  # moves every B away from 0
    adapted.eval()
    assert all(a.lora_B.abs().sum() > 0 for a in adapters_of(adapted).values())
    reference = copy.deepcopy(arch.model).double()
    stored_in_out = {p for p, s in adapted.meta["rosafx"]["sites"].items() if s["stored_in_out"]}
    with torch.no_grad():
        for path, site in adapted.meta["rosafx"]["sites"].items():
            adapter = adapters_of(adapted)[path]
            delta = adapter.scale * adapter.lora_B.double() @ adapter.lora_A.double()
            reference.get_parameter(site["weight_name"]).add_(delta.t() if path in stored_in_out else delta)
    inputs = arch.other_inputs()
    double_inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    want = out(reference, double_inputs)
    assert rel(out(adapted, inputs), want) < 1e-5
    merged = rosafx.merge(adapted)
    assert rel(out(merged, inputs), want) < 1e-5
    if arch.decoder:
        # the merged weights in the user's model, generating with its KV cache on, against
        # greedy decoding through the adapted and the merged graphs (no cache)
        ids = arch.inputs["input_ids"]
        with_cache = into_model(arch.model, merged).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, use_cache=True)
        assert torch.equal(greedy(merged, ids, max_new_tokens=4), with_cache)
        assert torch.equal(greedy(adapted, ids, max_new_tokens=4), with_cache)
