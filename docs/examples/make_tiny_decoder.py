"""A tiny random Llama with a byte-level BPE tokenizer trained on the GSM8K sample, saved as a
Hugging Face model directory: a decoder to try `rosafx train --task causal-lm` and `rosafx
evaluate` on from a fresh clone, with nothing downloaded (docs/generation.md). Its answers are
those of a random model; the commands, files and figures are the real ones.

    PYTHONSAFEPATH=1 .venv/bin/python docs/examples/make_tiny_decoder.py /tmp/tiny-llama [--chat-template]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny_decoders import CHATML, save_decoder  # noqa: E402  (the tests' own builder: one recipe for both)

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--arch", default="llama", choices=["llama", "gpt2", "qwen2"])
parser.add_argument("--chat-template", action="store_true", help="give the tokenizer a ChatML template")
args = parser.parse_args()
save_decoder(args.out, args.arch, chat_template=CHATML if args.chat_template else None)
print(f"wrote {args.out}")
