"""LoRA against HF PEFT: same adapter values give the same outputs, and adapters move
between the two tools in both directions."""
import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import rosafx
from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapters_of

from captures import exported
from invariants import perturb, rel_err
from models import VOCAB, main_output, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "bert": (tiny_bert, ["query", "value"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),        # Conv1D: PEFT's fan_in_fan_out
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj"]),
}
IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))


def rosafx_lora(factory, targets, rank=4, alpha=8):
    model, program, _ = exported(factory)
    adapted = rosafx.transform(program, {t: {"method": "lora", "rank": rank, "alpha": alpha} for t in targets})
    perturb(adapted)
    return model, adapted.eval()


def outputs(module):
    with torch.no_grad():
        return main_output(module(IDS)).float()


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_values_same_outputs_as_peft(name):
    factory, targets = CASES[name]
    model, adapted = rosafx_lora(factory, targets)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 fan_in_fan_out=name == "gpt2"))
    adapters = adapters_of(adapted)
    with torch.no_grad():
        for module_name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                adapter = adapters[module_name]
                module.lora_A["default"].weight.copy_(adapter.lora_A)
                module.lora_B["default"].weight.copy_(adapter.lora_B)
    peft_model.eval()
    assert len(adapters) == sum(1 for _, m in peft_model.named_modules() if hasattr(m, "lora_A")
                                and "default" in m.lora_A)
    assert rel_err(outputs(adapted), outputs(peft_model)) < 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_peft_loads_in_peft(name, tmp_path):
    factory, targets = CASES[name]
    _, adapted = rosafx_lora(factory, targets)
    rosafx.save(adapted, tmp_path / "peft", format="peft")
    fresh, _ = factory()
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    assert rel_err(outputs(peft_model), outputs(adapted)) < 1e-5


def test_peft_directory_loads_in_rosafx(tmp_path):
    model, _ = tiny_bert()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"],
                                                                 rank_pattern={"value": 2}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    loaded = rosafx.load(exported(tiny_bert)[1], tmp_path / "peft")
    assert rel_err(outputs(loaded), outputs(peft_model)) < 1e-5
    ranks = {p: c.rank for p, c in loaded.meta["rosafx"]["plan"].sites.items()}
    assert ranks["encoder.layer.0.attention.self.value"] == 2 and ranks["encoder.layer.0.attention.self.query"] == 4


def test_modules_to_save_round_trip(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    adapted = rosafx.transform(model, {"query": {"method": "lora", "rank": 2}, "classifier": {"method": "full"}})
    perturb(adapted)
    with torch.no_grad():
        adapted.classifier.weight.add_(1.0)
    rosafx.save(adapted, tmp_path / "peft", format="peft")
    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification(config).eval(), tmp_path / "peft").eval()
    assert rel_err(outputs(peft_model), outputs(adapted.eval())) < 1e-5
    torch.manual_seed(0)
    back = rosafx.load(BertForSequenceClassification(config).eval(), tmp_path / "peft")
    assert rel_err(outputs(back), outputs(adapted)) < 1e-6


def test_unsupported_peft_field_is_named(tmp_path):
    model, _ = tiny_bert()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["query"]))
    peft_model.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(RosafxError, match="use_dora"):
        rosafx.load(exported(tiny_bert)[1], tmp_path / "peft")


def test_other_base_weights_are_refused(tmp_path):
    _, adapted = rosafx_lora(tiny_bert, ["query"])
    rosafx.save(adapted, tmp_path / "a")
    other, program, _ = exported(tiny_bert)
    with torch.no_grad():
        other.encoder.layer[0].attention.self.query.weight.add_(0.01)   # the program reads it too
    with pytest.raises(RosafxError, match="fingerprint"):
        rosafx.load(program, tmp_path / "a")


@pytest.mark.parametrize("rules", [{"proj": {"method": "rosa", "rank": 2}},
                                   {"proj": {"method": "lora", "rank": 2}, "out": {"method": "vera", "rank": 4}}])
def test_peft_format_takes_one_method_that_peft_has(rules, tmp_path):
    """A method is written as PEFT only when it declares a PEFT type (lora, vera): rosa has none,
    and one directory holds one PEFT type."""
    from models import functional_linear
    model, example = functional_linear()
    adapted = rosafx.transform(model, rules, example_inputs=example)
    with pytest.raises(RosafxError, match=r"one method of \['lora', 'vera'\] per directory"):
        rosafx.save(adapted, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()
