"""Tiny Hugging Face architectures built in-process (no downloads): the issue-12 sweep.

``ARCHS`` maps a name to a factory returning ``Arch``: the model (eval, fixed seed), the
example inputs the capture uses (a dict with ``attention_mask`` where the model takes one,
with padding in the second row) and a function giving inputs of another batch/sequence
size. Used by tests/test_architectures.py and the full sweep, tests/arch_sweep.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

VOCAB = 97
H, LAYERS, HEADS = 32, 2, 4


@dataclass
class Arch:
    model: torch.nn.Module
    inputs: dict
    other_inputs: Callable[[], dict]   # another batch size and sequence length
    decoder: bool = False              # a causal LM: generate() with the KV cache is checked
    targets: str = ".*"                # rule key selecting the sites to adapt


def _ids(batch, seq, seed=0, low=1):
    return torch.randint(low, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _mask(batch, seq, padded=True):
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded and batch > 1:
        mask[1, seq - 2:] = 0  # right padding in the second row
    return mask


def _text(batch=2, seq=7, seed=0, mask=True, **extra):
    inputs = {"input_ids": _ids(batch, seq, seed)}
    if mask:
        inputs["attention_mask"] = _mask(batch, seq)
    return {**inputs, **extra}


def _text_arch(model, decoder=False, mask=True, targets=".*"):
    return Arch(model.eval(), _text(mask=mask), lambda: _text(3, 5, seed=1, mask=mask), decoder, targets)


def _causal(config_cls, model_cls, **kw):
    def factory():
        torch.manual_seed(0)
        config = config_cls(**kw)
        return _text_arch(model_cls(config), decoder=True)
    return factory


def _encoder(config_cls, model_cls, **kw):
    def factory():
        torch.manual_seed(0)
        return _text_arch(model_cls(config_cls(**kw)))
    return factory


def _llama_like(prefix):
    import transformers
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    extra = {"head_dim": H // HEADS} if prefix in ("Gemma", "Gemma2", "Qwen3") else {}
    return _causal(config_cls, model_cls, vocab_size=VOCAB, hidden_size=H, intermediate_size=48,
                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def _t(name):
    import transformers
    return getattr(transformers, name)


def bert_family(prefix, model_name=None, **kw):
    def factory():
        torch.manual_seed(0)
        config = _t(f"{prefix}Config")(**{"vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": LAYERS,
                                          "num_attention_heads": HEADS, "intermediate_size": 48,
                                          "max_position_embeddings": 64, "pad_token_id": 0, **kw})
        return _text_arch(_t(model_name or f"{prefix}ForSequenceClassification")(config))
    return factory


def distilbert():
    torch.manual_seed(0)
    config = _t("DistilBertConfig")(vocab_size=VOCAB, dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=48,
                                    max_position_embeddings=64)
    return _text_arch(_t("DistilBertForSequenceClassification")(config))


def gpt2():
    torch.manual_seed(0)
    config = _t("GPT2Config")(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _text_arch(_t("GPT2LMHeadModel")(config), decoder=True)


def gpt_neo():
    torch.manual_seed(0)
    config = _t("GPTNeoConfig")(vocab_size=VOCAB, hidden_size=H, num_layers=LAYERS, num_heads=HEADS,
                                attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
                                window_size=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _text_arch(_t("GPTNeoForCausalLM")(config), decoder=True)


def gptj():
    torch.manual_seed(0)
    config = _t("GPTJConfig")(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                              rotary_dim=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _text_arch(_t("GPTJForCausalLM")(config), decoder=True)


def opt():
    torch.manual_seed(0)
    config = _t("OPTConfig")(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             ffn_dim=48, word_embed_proj_dim=H, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _text_arch(_t("OPTForCausalLM")(config), decoder=True)


def bloom():
    torch.manual_seed(0)
    config = _t("BloomConfig")(vocab_size=VOCAB, hidden_size=H, n_layer=LAYERS, n_head=HEADS,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _text_arch(_t("BloomForCausalLM")(config), decoder=True)


def phi():
    torch.manual_seed(0)
    config = _t("PhiConfig")(vocab_size=VOCAB, hidden_size=H, intermediate_size=48, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, max_position_embeddings=64, partial_rotary_factor=0.5,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _text_arch(_t("PhiForCausalLM")(config), decoder=True)


def phi3():
    torch.manual_seed(0)
    config = _t("Phi3Config")(vocab_size=VOCAB, hidden_size=H, intermediate_size=48, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _text_arch(_t("Phi3ForCausalLM")(config), decoder=True)


def mpt():
    torch.manual_seed(0)
    config = _t("MptConfig")(vocab_size=VOCAB, d_model=H, n_layers=LAYERS, n_heads=HEADS, max_seq_len=64,
                             expansion_ratio=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _text_arch(_t("MptForCausalLM")(config), decoder=True)


def falcon():
    torch.manual_seed(0)
    config = _t("FalconConfig")(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _text_arch(_t("FalconForCausalLM")(config), decoder=True)


def mixtral(implementation):
    def factory():
        torch.manual_seed(0)
        config = _t("MixtralConfig")(vocab_size=VOCAB, hidden_size=H, intermediate_size=48, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = _t("MixtralForCausalLM")(config)
        if implementation is not None:
            model.set_experts_implementation(implementation)
        return _text_arch(model, decoder=True)
    return factory


def _seq2seq_inputs(batch, seq, seed):
    return {**_text(batch, seq, seed), "decoder_input_ids": _ids(batch, seq - 2, seed + 10)}


def t5():
    torch.manual_seed(0)
    config = _t("T5Config")(vocab_size=VOCAB, d_model=H, d_kv=8, d_ff=48, num_layers=LAYERS, num_heads=HEADS,
                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return Arch(_t("T5ForConditionalGeneration")(config).eval(), _seq2seq_inputs(2, 7, 0),
                lambda: _seq2seq_inputs(3, 6, 1))


def bart():
    torch.manual_seed(0)
    config = _t("BartConfig")(vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS,
                              encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=48,
                              decoder_ffn_dim=48, max_position_embeddings=64,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    return Arch(_t("BartForConditionalGeneration")(config).eval(), _seq2seq_inputs(2, 7, 0),
                lambda: _seq2seq_inputs(3, 6, 1))


def _whisper_inputs(batch, seq, seed, mel=16, frames=32):
    gen = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(batch, mel, frames, generator=gen),
            "decoder_input_ids": _ids(batch, seq, seed)}


def whisper():
    torch.manual_seed(0)
    config = _t("WhisperConfig")(vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                 encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=48,
                                 decoder_ffn_dim=48, num_mel_bins=16, max_source_positions=16,
                                 max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 decoder_start_token_id=1)
    return Arch(_t("WhisperForConditionalGeneration")(config).eval(), _whisper_inputs(2, 5, 0),
                lambda: _whisper_inputs(3, 4, 1))


def _pixels(batch, size, seed):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vit():
    torch.manual_seed(0)
    config = _t("ViTConfig")(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=48, image_size=32, patch_size=8, num_labels=3)
    return Arch(_t("ViTForImageClassification")(config).eval(), {"pixel_values": _pixels(2, 32, 0)},
                lambda: {"pixel_values": _pixels(3, 32, 1)})


def clip():
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=48, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=H, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  image_size=32, patch_size=8)
    config = _t("CLIPConfig")(text_config=text, vision_config=vision, projection_dim=16)
    return Arch(_t("CLIPModel")(config).eval(), {**_text(), "pixel_values": _pixels(2, 32, 0)},
                lambda: {**_text(3, 5, 1), "pixel_values": _pixels(3, 32, 1)})


ARCHS: dict[str, Callable[[], Arch]] = {
    "bert": bert_family("Bert"),
    "roberta": bert_family("Roberta", pad_token_id=1),
    "xlm-roberta": bert_family("XLMRoberta", pad_token_id=1),
    "distilbert": distilbert,
    "albert": bert_family("Albert", embedding_size=16),
    "electra": bert_family("Electra", embedding_size=16),
    "deberta-v2": bert_family("DebertaV2"),
    "gpt2": gpt2,
    "gpt-neo": gpt_neo,
    "gpt-j": gptj,
    "opt": opt,
    "bloom": bloom,
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3"),
    "gemma": _llama_like("Gemma"),
    "gemma2": _llama_like("Gemma2"),
    "phi": phi,
    "phi3": phi3,
    "mpt": mpt,
    "falcon": falcon,
    "mixtral": mixtral(None),              # default: grouped experts (transformers::grouped_mm_fallback)
    "mixtral-eager": mixtral("eager"),     # loop over experts hit: torch.export cannot trace it
    "t5": t5,
    "bart": bart,
    "whisper": whisper,
    "vit": vit,
    "clip": clip,
}
