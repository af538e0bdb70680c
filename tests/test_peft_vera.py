"""VeRA against HF PEFT: the same shared random pair for the same seed, the same outputs for
the same d, b, and adapters moving between the two tools in both directions."""
import copy
import json

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model

import rosafx
from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapters_of

from captures import exported
from invariants import perturb, rel_err
from models import VOCAB, main_output, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "bert": (tiny_bert, ["query", "value", "dense"]),      # dense: 32x48 and 48x32, the pair is sliced
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),             # Conv1D: PEFT's fan_in_fan_out
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj"]),  # GQA: k/v narrower than q
}
IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
RANK, SEED = 8, 7


def outputs(module):
    with torch.no_grad():
        return main_output(module(IDS)).float()


def peft_vera(model, targets, name, **extra):
    config = VeraConfig(r=RANK, target_modules=targets, projection_prng_key=SEED, fan_in_fan_out=name == "gpt2",
                        **extra)
    return get_peft_model(copy.deepcopy(model), config)


def rosafx_vera(factory, targets):
    model, program, _ = exported(factory)
    adapted = rosafx.transform(program, {t: {"method": "vera", "rank": RANK, "seed": SEED} for t in targets})
    perturb(adapted)
    return model, adapted.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_pair_and_same_outputs_as_peft(name):
    factory, targets = CASES[name]
    model, adapted = rosafx_vera(factory, targets)
    peft_model = peft_vera(model, targets, name)
    assert torch.equal(adapted.rosafx_shared.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(adapted.rosafx_shared.vera_B, peft_model.base_model.vera_B["default"])
    adapters = adapters_of(adapted)
    copied = 0
    with torch.no_grad():
        for module_name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "vera_lambda_d") and "default" in module.vera_lambda_d:
                adapter = adapters[module_name]
                module.vera_lambda_d["default"].copy_(adapter.lambda_d)
                module.vera_lambda_b["default"].copy_(adapter.lambda_b)
                copied += 1
    assert copied == len(adapters)
    assert rel_err(outputs(adapted), outputs(peft_model.eval())) < 1e-5
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert peft_trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_peft_loads_in_peft(name, tmp_path):
    factory, targets = CASES[name]
    _, adapted = rosafx_vera(factory, targets)
    rosafx.save(adapted, tmp_path / "peft", format="peft")
    fresh, _ = factory()
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    assert rel_err(outputs(peft_model), outputs(adapted)) < 1e-5


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_directory_loads_in_rosafx(save_projection, tmp_path):
    model, _ = tiny_bert()
    peft_model = peft_vera(model, CASES["bert"][1], "bert", save_projection=save_projection)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    loaded = rosafx.load(exported(tiny_bert)[1], tmp_path / "peft")
    assert rel_err(outputs(loaded), outputs(peft_model)) < 1e-5
    assert {c.seed for c in loaded.meta["rosafx"]["plan"].sites.values()} == {SEED}


def test_unsupported_peft_field_is_named(tmp_path):
    model, _ = tiny_bert()
    peft_vera(model, ["query"], "bert").save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["layers_to_transform"] = [0]
    config_path.write_text(json.dumps(config))
    with pytest.raises(RosafxError, match="layers_to_transform"):
        rosafx.load(exported(tiny_bert)[1], tmp_path / "peft")
