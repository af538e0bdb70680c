"""Tiny random decoders with a local tokenizer, for the instruction-data tests: a byte-level
BPE trained here on the GSM8K sample (the `tokenizers` library, no download) with
<s>, </s>, <pad>, and a Llama / GPT-2 / Qwen2 model sized to it."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

GSM8K_SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
SPECIALS = ["<pad>", "<s>", "</s>"]
# A chat template in the style of ChatML (Qwen2), for the templated path.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gsm8k_rows() -> list[dict]:
    return [json.loads(line) for line in GSM8K_SAMPLE.read_text().splitlines()]


@functools.lru_cache(maxsize=8)   # trained once per process per setting; callers do not change it
def bpe_tokenizer(vocab: int = 400, chat_template: str | None = None, eos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows()]
    specials = SPECIALS + (["<|im_start|>", "<|im_end|>"] if chat_template else [])
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>" if eos else None)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_decoder(arch: str, vocab: int, seed: int = 0, positions: int = 256):
    import transformers
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=positions,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    prefix = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=positions, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return getattr(transformers, f"{prefix}ForCausalLM")(config).eval()


def save_decoder(path: Path, arch: str = "llama", **tokenizer_kw) -> Path:
    from transformers import AutoTokenizer
    bpe_tokenizer(**tokenizer_kw).save_pretrained(path)
    tiny_decoder(arch, 8).config.save_pretrained(path)   # the model type decides the tokenizer class loaded back
    # sized by the tokenizer as loaded back (Qwen2's class adds a token of its own)
    tiny_decoder(arch, len(AutoTokenizer.from_pretrained(path, local_files_only=True))).save_pretrained(path)
    return path
