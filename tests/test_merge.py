"""Merge: exact against float64 W + s·B·A, ties broken rather than changed, finite check."""
import pytest
import torch

import rosafx
from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapters_of

from captures import exported
from invariants import perturb
from models import VOCAB, called_twice, tiny_bert, tiny_gpt2


def test_merged_weight_equals_float64_formula():
    model, program, _ = exported(tiny_bert)
    adapted = rosafx.transform(program, {"query": {"method": "lora", "rank": 3, "alpha": 5}})
    perturb(adapted)
    merged = rosafx.merge(adapted)
    for layer in range(2):
        path = f"encoder.layer.{layer}.attention.self.query"
        adapter = adapters_of(adapted)[path]
        W0 = model.get_submodule(path).weight.double()
        want = W0 + (5 / 3) * adapter.lora_B.double() @ adapter.lora_A.double()
        got = merged.get_parameter(f"{path}.weight").double()
        assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_tied_head_is_untied_not_changed():
    model, program, _ = exported(tiny_gpt2)
    adapted = rosafx.transform(program, {"lm_head": {"method": "lora", "rank": 2}})
    perturb(adapted)
    merged = rosafx.merge(adapted)
    embedding_weights = [p for n, p in merged.named_parameters() if n.endswith("wte.weight") or n == "lm_head.weight"]
    assert any(torch.equal(p, model.transformer.wte.weight) for p in embedding_weights)
    head = merged.get_parameter("lm_head.weight_merged")
    assert not torch.equal(head, model.lm_head.weight)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # the user's tie is intact
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)


def test_module_called_twice_merges_once():
    model, example = called_twice()
    adapted = rosafx.transform(model, {"shared": {"method": "lora", "rank": 2}}, example_inputs=example)
    assert len(adapters_of(adapted)) == 1
    perturb(adapted)
    merged = rosafx.merge(adapted)
    assert sum(1 for n, _ in merged.named_parameters() if n.startswith("shared.weight")) == 1
    with torch.no_grad():
        assert torch.allclose(merged(*example), adapted(*example), atol=1e-6)


def test_non_finite_merge_is_refused():
    model, program, _ = exported(tiny_bert)
    adapted = rosafx.transform(program, {"query": {"method": "lora", "rank": 2}})
    with torch.no_grad():
        next(iter(adapters_of(adapted).values())).lora_B.fill_(float("inf"))
    with pytest.raises(RosafxError, match="non-finite"):
        rosafx.merge(adapted)


def test_merge_takes_only_adapted_models():
    with pytest.raises(RosafxError, match="rosafx.transform"):
        rosafx.merge(torch.nn.Linear(2, 2))
