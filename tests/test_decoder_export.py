"""A decoder's ONNX with the KV cache (rosafx/recipes/decoder_export.py, onnx_decoding.py):
onnxruntime's greedy tokens, one call per new token, equal transformers' own greedy
``generate`` with its cache on the model carrying the merged weights; and the same through
`rosafx train` -> `export` -> `generate`."""
from __future__ import annotations

import onnx
import pytest
import torch

import rosafx
from arch_zoo import _llama_like, gpt2
from rosafx.recipes.decoder_export import CacheLayout, export_cached_decoder
from rosafx.recipes.generation import greedy_with_cache, into_model
from rosafx.recipes.onnx_decoding import OnnxDecoder

FAMILIES = {"llama": (_llama_like("Llama"), ["q_proj", "v_proj", "down_proj"]),
            "gpt2": (gpt2, ["c_attn", "c_fc"]),
            "qwen2": (_llama_like("Qwen2"), ["q_proj", "v_proj", "down_proj"])}
NEW_TOKENS = 32


def merged_model(family):
    """A tiny random decoder with LoRA on some sites, adapters made non-zero (so the merge
    changes the weights), merged and put back into a copy of the HF model."""
    factory, targets = FAMILIES[family]
    arch = factory()
    adapted = rosafx.transform(arch.model, {t: {"method": "lora", "rank": 2, "alpha": 4} for t in targets})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    merged = into_model(arch.model, rosafx.merge(adapted))
    changed = any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), arch.model.state_dict().values()))
    assert changed, "the adapters did not change the model: the test would not see a merge error"
    return merged


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_greedy_with_cache_equals_torch(family, tmp_path):
    model = merged_model(family)
    report = export_cached_decoder(model, tmp_path / "decoder.onnx")
    layout = CacheLayout.of(model.config)
    graph = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + layout.names()
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(layout.layers) for k in ("key", "value")]
    assert report.max_abs_error < 1e-4

    decoder = OnnxDecoder(tmp_path / "decoder.onnx")
    for seed in (5, 7):
        prompt = torch.randint(3, 97, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = greedy_with_cache(model, prompt, NEW_TOKENS)  # transformers' generate, its own cache
        decoder.fed.clear()
        got = decoder.greedy(prompt, NEW_TOKENS)
        assert len(want) == NEW_TOKENS and len(set(want)) > 2, want  # tokens that vary: a real check
        assert got == want
        assert decoder.fed == [len(prompt)] + [1] * (NEW_TOKENS - 1)  # the prompt once, then one token a call


def test_eos_stops_both_sides_alike(tmp_path):
    model = merged_model("qwen2")
    export_cached_decoder(model, tmp_path / "decoder.onnx")
    prompt = torch.randint(3, 97, (7,), generator=torch.Generator().manual_seed(5)).tolist()
    free = greedy_with_cache(model, prompt, NEW_TOKENS)
    stop = free[10]  # a token generated at step 11 (and maybe earlier) ends generation
    want = greedy_with_cache(model, prompt, NEW_TOKENS, {stop})
    assert want == free[:free.index(stop) + 1]
    assert OnnxDecoder(tmp_path / "decoder.onnx").greedy(prompt, NEW_TOKENS, {stop}) == want
