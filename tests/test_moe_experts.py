"""MoE expert weights (one E x out x in parameter) as per-expert sites: rules, identity,
exact merge against a float64 eager reference, training, save/load, HF PEFT's
target_parameters both ways, and ONNX of the merged grouped-experts Mixtral (grouped_mm
decomposed)."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import rosafx
from rosafx.graph.capture import capture
from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapters_of
from rosafx.passes.bank import site_grad
from rosafx.graph.sites import find_sites

from models import VOCAB

LORA = {"method": "lora", "rank": 2, "alpha": 4}
IDS = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
EXPERTS = 4


def tiny_mixtral(implementation=None):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                           num_experts_per_tok=2, max_position_embeddings=64)
    model = MixtralForCausalLM(config).eval()
    if implementation is not None:
        model.set_experts_implementation(implementation)
    return model


def randomize(adapted, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters_of(adapted).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.1)


def logits(module, ids=IDS):
    with torch.no_grad():
        return module(ids).logits.float()


def float64_reference(model, adapted):
    """The eager model (batched experts: grouped_mm has no float64 CPU kernel) with each
    site's W + s·B·A written into its slice, in float64."""
    ref = copy.deepcopy(model).double()
    ref.set_experts_implementation("batched_mm")
    sites = {s.path: s for s in find_sites(capture(model)[0])}
    with torch.no_grad():
        for path in adapted.meta["rosafx"]["sites"]:
            adapter, site = adapters_of(adapted)[path], sites[path]
            delta = adapter.scale * adapter.lora_B.double() @ adapter.lora_A.double()
            weight = ref.get_parameter(site.weight_name)
            target = weight[site.expert] if site.expert is not None else weight
            target += delta.t() if site.stored_in_out else delta
    return ref


@pytest.fixture(scope="module")
def grouped():
    model = tiny_mixtral()
    adapted = rosafx.transform(model, {"gate_up_proj": LORA, "experts.2.down_proj": LORA, "q_proj": LORA})
    return model, adapted


def test_expert_slices_are_sites_rules_address(grouped):
    model, adapted = grouped
    sites = adapted.meta["rosafx"]["sites"]
    assert len(sites) == 2 * EXPERTS + 2 + 2
    assert "model.layers.1.mlp.experts.3.gate_up_proj" in sites
    assert "model.layers.0.mlp.experts.2.down_proj" in sites and "model.layers.0.mlp.experts.1.down_proj" not in sites
    gate_up = adapters_of(adapted)["model.layers.0.mlp.experts.0.gate_up_proj"]
    assert tuple(gate_up.lora_B.shape) == (2 * 48, 2) and tuple(gate_up.lora_A.shape) == (2, 32)
    assert (logits(adapted) - logits(model)).abs().max() < 1e-6  # B = 0: identity


def test_batched_experts_give_the_same_sites():
    grouped_sites = {(s.path, (s.out_features, s.in_features)) for s in find_sites(capture(tiny_mixtral())[0])
                     if s.expert is not None}
    batched_sites = {(s.path, (s.out_features, s.in_features))
                     for s in find_sites(capture(tiny_mixtral("batched_mm"))[0]) if s.expert is not None}
    assert grouped_sites == batched_sites and len(grouped_sites) == 2 * 2 * EXPERTS


def test_adapted_and_merged_match_float64_reference(grouped):
    model, adapted = grouped
    randomize(adapted)
    want = logits(float64_reference(model, adapted))
    merged = rosafx.merge(adapted)
    assert (logits(adapted) - want).abs().max() < 1e-5
    assert (logits(merged) - want).abs().max() < 1e-5
    merged_state = merged.state_dict()
    assert all(merged_state[k].shape == v.shape for k, v in model.state_dict().items())  # the base's layout


def test_train_step_reaches_every_expert_adapter(grouped):
    model, _ = grouped
    adapted = rosafx.transform(model, {"gate_up_proj": LORA, "experts.2.down_proj": LORA})
    randomize(adapted)
    adapted.train()
    adapted(IDS).logits.square().mean().backward()
    # every expert is routed some token of this batch, so every A gets a gradient
    grads = [site_grad(adapted, a, "lora_A") for a in adapters_of(adapted).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not any(p.requires_grad for n, p in adapted.named_parameters() if "rosafx" not in n)


def test_save_load_round_trip(grouped, tmp_path):
    model, adapted = grouped
    randomize(adapted, seed=7)
    rosafx.save(adapted, tmp_path / "a")
    loaded = rosafx.load(model, tmp_path / "a")
    assert torch.equal(logits(loaded), logits(adapted))


def test_dropout_or_other_methods_on_experts_are_refused():
    model = tiny_mixtral()
    with pytest.raises(RosafxError, match="dropout"):
        rosafx.transform(model, {"gate_up_proj": {**LORA, "dropout": 0.1}})
    with pytest.raises(RosafxError, match="expert"):
        rosafx.transform(model, {"gate_up_proj": {"method": "vera", "rank": 2}})


@pytest.fixture(scope="module")
def all_experts():
    model = tiny_mixtral()
    adapted = rosafx.transform(model, {"gate_up_proj": LORA, "down_proj": LORA, "q_proj": LORA})
    randomize(adapted, seed=11)
    return model, adapted


def test_peft_target_parameters_written_by_rosafx_load_in_peft(all_experts, tmp_path):
    model, adapted = all_experts
    rosafx.save(adapted, tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    assert (logits(peft_model) - logits(adapted)).abs().max() < 1e-5


def test_peft_target_parameters_load_in_rosafx(tmp_path):
    model = tiny_mixtral()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = rosafx.load(model, tmp_path / "peft")
    assert len(loaded.meta["rosafx"]["sites"]) == 2 * 2 * EXPERTS + 2
    assert (logits(loaded) - logits(peft_model.eval())).abs().max() < 1e-5


def test_merged_grouped_experts_export_to_onnx(all_experts, tmp_path):
    _, adapted = all_experts
    report = rosafx.export_onnx(adapted, tmp_path / "mixtral.onnx", compare_base=False, latency_repeats=0)
    assert report.max_abs_error < 1e-4
