"""Graph-break fallback on Mixtral with eager experts (a loop over nonzero() results that
torch.export cannot trace): the exportable submodules become graphs, the expert loop stays
Python. References: the user's eager model (identity), its float64 copy with W + ΔW written
into the weights (adapted and merged), HF PEFT loading what rosafx writes and vice versa."""
import copy
import warnings

import pytest
import torch
from peft import PeftModel

import rosafx
from rosafx.errors import RosafxError
from rosafx.pipeline.partial import PartlyCaptured
from rosafx.graph.adapted_graph import adapters_of

from arch_zoo import ARCHS

LORA = {"method": "lora", "rank": 2, "alpha": 4}
RULES = {".*": LORA, "lm_head": None}


def logits(module, inputs):
    with torch.no_grad():
        return module(**inputs).logits.float()


def randomize(adapted, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters_of(adapted).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def eager_mixtral():
    arch = ARCHS["mixtral-eager"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = rosafx.transform(arch.model, RULES, example_inputs=arch.inputs)
    assert any("submodules that export" in str(w.message) for w in caught)  # says it fell back
    return arch, adapted


def test_parts_are_graphs_and_the_expert_loop_stays_python(eager_mixtral):
    arch, adapted = eager_mixtral
    assert isinstance(adapted, PartlyCaptured)
    meta = adapted.meta["rosafx"]
    assert {"model.layers.0.self_attn", "model.layers.1.mlp.gate"} <= set(meta["parts"])
    assert "nonzero" in meta["python"]["model.layers.0.mlp.experts"] or "data-dependent" in \
        meta["python"]["model.layers.0.mlp.experts"]
    assert all(isinstance(gm, torch.fx.GraphModule) for gm in adapted.parts().values())
    assert len(meta["sites"]) == 2 * 5  # q, k, v, o and the router per layer
    assert "model.layers.1.self_attn.q_proj" in meta["sites"]


def test_identity_on_padded_unpadded_and_other_sized_batches(eager_mixtral):
    arch, adapted = eager_mixtral
    unpadded = {"input_ids": arch.inputs["input_ids"], "attention_mask": torch.ones_like(arch.inputs["input_ids"])}
    for inputs in (arch.inputs, arch.other_inputs(), unpadded):  # no padding: the parts are traced again
        assert (logits(adapted, inputs) - logits(arch.model, inputs)).abs().max() < 1e-6


def test_train_step_touches_only_adapters(eager_mixtral):
    arch, adapted = eager_mixtral
    randomize(adapted, seed=1)  # B = 0 would leave A without a gradient
    adapted.train()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(adapted.meta["rosafx"]["sites"])
    adapted(**arch.inputs).logits.square().mean().backward()
    adapted.eval()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.requires_grad for p in arch.model.parameters())  # the user's model is not frozen


def test_adapted_and_merged_match_float64_reference(eager_mixtral):
    arch, adapted = eager_mixtral
    randomize(adapted)
    reference = copy.deepcopy(arch.model).double()
    with torch.no_grad():
        for path in adapted.meta["rosafx"]["sites"]:
            adapter = adapters_of(adapted)[path]
            reference.get_parameter(f"{path}.weight").add_(
                adapter.scale * adapter.lora_B.double() @ adapter.lora_A.double())
    inputs = arch.other_inputs()
    want = logits(reference, inputs)
    merged = rosafx.merge(adapted)
    assert (logits(adapted, inputs) - want).abs().max() < 1e-5
    assert (logits(merged, inputs) - want).abs().max() < 1e-5
    assert not any("rosafx" in name for name, _ in merged.named_parameters())


def test_save_load_and_peft_both_ways(eager_mixtral, tmp_path):
    arch, adapted = eager_mixtral
    randomize(adapted, seed=5)
    want = logits(adapted, arch.inputs)
    rosafx.save(adapted, tmp_path / "rosafx")
    assert torch.equal(logits(rosafx.load(arch.model, tmp_path / "rosafx", example_inputs=arch.inputs),
                              arch.inputs), want)
    rosafx.save(adapted, tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(arch.model), tmp_path / "peft").eval()
    assert (logits(peft_model, arch.inputs) - want).abs().max() < 1e-5
    back = rosafx.load(arch.model, tmp_path / "peft", example_inputs=arch.inputs)
    assert (logits(back, arch.inputs) - want).abs().max() < 1e-6


def test_onnx_and_whole_graph_passes_are_refused(eager_mixtral, tmp_path):
    _, adapted = eager_mixtral
    with pytest.raises(RosafxError, match="parts"):
        rosafx.export_onnx(adapted, tmp_path / "m.onnx")
    with pytest.raises(RosafxError, match="parts"):
        rosafx.lower(adapted)
