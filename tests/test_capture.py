"""Capture and transform: inputs, modes, dtypes, the user's model left alone."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import rosafx
from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapter_nodes, adapters_of

from invariants import perturb, rel_err
from models import VOCAB, functional_linear, main_output, tiny_bert, tiny_gpt2

LORA = {"method": "lora", "rank": 4, "alpha": 8}


def test_padded_batches_with_attention_mask():
    model, _ = tiny_bert()
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    adapted = rosafx.transform(model, {"query": LORA}, example_inputs={"input_ids": ids, "attention_mask": mask})
    ids2 = torch.randint(1, VOCAB, (3, 6))
    mask2 = torch.ones_like(ids2)
    mask2[0, 2:] = 0
    with torch.no_grad():
        got = adapted(input_ids=ids2, attention_mask=mask2).last_hidden_state
        want = model(input_ids=ids2, attention_mask=mask2).last_hidden_state
    assert rel_err(got, want) < 1e-6


def test_called_positionally_with_same_output_type():
    model, _ = tiny_gpt2()
    adapted = rosafx.transform(model, {"c_attn": LORA})
    ids = torch.randint(0, VOCAB, (2, 5))
    out = adapted(ids)
    assert type(out) is type(model(ids))


def test_dropout_follows_train_and_eval():
    model, _ = tiny_bert()  # hidden dropout 0.1 in the base model, plus adapter dropout
    adapted = rosafx.transform(model, {"query": {**LORA, "dropout": 0.5}})
    ids = torch.randint(0, VOCAB, (2, 7))
    adapted.train()
    assert not torch.equal(main_output(adapted(ids)), main_output(adapted(ids)))
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(main_output(adapted(ids)), main_output(adapted(ids)))
        assert rel_err(main_output(adapted(ids)), main_output(model(ids))) < 1e-6


def test_nodes_keep_module_paths():
    model, _ = tiny_bert()
    adapted = rosafx.transform(model, {"query": LORA})
    nodes = adapter_nodes(adapted)
    assert len(nodes) == 2
    for node in nodes:
        path = list(node.meta["nn_module_stack"].values())[-1][0]
        assert path == node.meta["rosafx"]["site"]


def test_user_model_is_never_changed():
    model, _ = tiny_bert()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    adapted = rosafx.transform(model, {".*": LORA, "pooler.dense": {"method": "full"}})
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    adapted.train()
    main_output(adapted(torch.randint(0, VOCAB, (2, 7)))).sum().backward()
    optimizer.step()
    rosafx.merge(adapted)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name][0]) and param.requires_grad == before[name][1], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_with_fp32_adapters(dtype):
    model, _ = tiny_bert()
    model = model.to(dtype)
    adapted = rosafx.transform(model, {"query": LORA, "value": LORA})
    assert all(p.dtype == torch.float32 for a in adapters_of(adapted).values() for p in a.parameters())
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(main_output(adapted(ids)), main_output(model(ids)))
    perturb(adapted)
    merged = rosafx.merge(adapted)
    assert merged.get_parameter("encoder.layer.0.attention.self.query.weight").dtype == dtype
    with torch.no_grad():
        got, want = main_output(merged(ids)).float(), main_output(adapted(ids)).float()
    assert rel_err(got, want) < 2e-2  # half-precision rounding of W + ΔW


def test_full_method_trains_a_fresh_head_and_is_saved(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    adapted = rosafx.transform(model, {"query": LORA, "classifier": {"method": "full"}})
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    head_before = model.classifier.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = torch.randint(0, VOCAB, (4, 6)), torch.tensor([0, 1, 2, 1])
    adapted.train()
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(adapted(ids).logits, labels).backward()
        optimizer.step()
    assert not torch.equal(adapted.classifier.weight, head_before)
    assert torch.equal(model.classifier.weight, head_before)
    rosafx.save(adapted, tmp_path / "a")
    torch.manual_seed(0)
    fresh = BertForSequenceClassification(config).eval()  # same seed: same base weights
    loaded = rosafx.load(fresh, tmp_path / "a")
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, adapted(ids).logits)


def test_exported_program_input():
    model, example = functional_linear()
    program = torch.export.export(model, example)
    adapted = rosafx.transform(program, {"proj": LORA})
    with torch.no_grad():
        assert torch.equal(adapted(*example), model(*example))


def test_plain_module_needs_example_inputs():
    model, _ = functional_linear()
    with pytest.raises(RosafxError, match="example_inputs"):
        rosafx.transform(model, {"proj": LORA})


def test_bad_example_inputs_are_a_clear_error():
    model, _ = functional_linear()
    with pytest.raises(RosafxError, match="torch.export could not capture"):
        rosafx.transform(model, {"proj": LORA}, example_inputs=(torch.randn(2, 3),))
