"""Packing (rosafx/recipes/data/packing.py): rows hold whole examples within the width; packed
and unpacked batches give the same per-example loss through the captured graph (Llama, GPT-2,
Qwen2, float64), the reference being each example run alone through the plain HF model; a
model whose attention cannot take the 4-D mask is refused."""
from __future__ import annotations

import pytest
import torch

import rosafx
from rosafx.errors import RosafxError
from rosafx.recipes.data import encode, examples_from, model_inputs, read_table
from rosafx.recipes.data.packing import PackedBatches, check_keeps_examples_apart, pack, packed_batch
from tiny_decoders import GSM8K_SAMPLE, bpe_tokenizer, tiny_decoder

WIDTH = 96


@pytest.fixture(scope="module")
def encoded():
    tokenizer = bpe_tokenizer()
    examples = examples_from(read_table(GSM8K_SAMPLE), "causal-lm")
    # short examples of different lengths: truncation to 40 tokens and a few lengths below
    return encode(examples, tokenizer, 40)


def test_pack_rows_fit_and_hold_every_example_once():
    lengths = [5, 9, 1, 16, 7, 3, 3, 12, 16, 2]
    rows = pack(lengths, 16)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    assert len(rows) == -(-sum(lengths) // 16)   # these lengths pack without waste: 94 tokens in 6 rows


def per_example_nll(logits, labels, segments):
    """Sum of -log p of each labelled token, in float64, per example id in ``segments``."""
    logp = torch.log_softmax(logits.double(), -1)
    out = {}
    for r in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[r, t] != -100:
                key = segments[r][t]
                out[key] = out.get(key, 0.0) - float(logp[r, t - 1, labels[r, t]])
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_packed_and_unpacked_batches_give_the_same_per_example_loss(encoded, arch):
    model = tiny_decoder(arch, 400).double()
    examples = list(range(12))
    rows = pack(encoded.lengths[examples].tolist(), WIDTH)
    assert any(len(row) > 1 for row in rows)                      # examples do share rows
    sample = packed_batch(encoded, [[0], [1]])
    adapted = rosafx.transform(model, {"re:.*(q_proj|v_proj|c_attn)": {"method": "lora", "rank": 2}},
                               example_inputs=model_inputs(sample))
    with torch.no_grad():   # non-zero adapters, so the adapted graph is not the base model
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = packed_batch(encoded, rows)
    logits = adapted(**model_inputs(batch))
    logits = logits.logits if hasattr(logits, "logits") else logits[0]
    segments = []
    for row in rows:
        segments.append([i for i in row for _ in range(int(encoded.lengths[i]))] + [-1] * WIDTH)
    packed = per_example_nll(logits.detach(), batch["labels"], segments)

    from rosafx.recipes.generation import into_model
    plain = into_model(model, rosafx.merge(adapted)).double()   # the adapters folded into the HF model
    for i in examples:
        tokens = torch.tensor([encoded.tokens(i)])
        labels = tokens.clone()
        labels[0, :int(encoded.prompt_lengths[i])] = -100
        with torch.no_grad():
            alone = per_example_nll(plain(input_ids=tokens).logits, labels, [[i] * tokens.shape[1]])
        assert packed[i] == pytest.approx(alone[i], rel=1e-9, abs=1e-9), i


def test_packed_batches_cover_every_labelled_token_once(encoded):
    batches = PackedBatches(encoded, 3, WIDTH, shuffle=True, seed=1)
    labelled = sum(int((b["labels"] != -100).sum()) for b in batches)
    expected = int((encoded.lengths - encoded.prompt_lengths).sum())
    assert labelled == expected
    first = [b["input_ids"].tolist() for b in batches]
    batches.set_epoch(1)
    assert [b["input_ids"].tolist() for b in batches] != first   # the order of rows changes by epoch


def test_a_model_with_eager_attention_is_refused():
    model = tiny_decoder("llama", 400)
    check_keeps_examples_apart(model, "llama")   # sdpa takes the boolean 4-D mask
    model.config._attn_implementation = "eager"
    with pytest.raises(RosafxError, match="cannot train packed rows.*Train without --pack"):
        check_keeps_examples_apart(model, "llama")
