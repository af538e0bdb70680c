"""Per-token latency of greedy decoding in onnxruntime: the decoder ONNX with the KV cache
(``model_with_past.onnx``: one call on one token per new token) against the cache-less export
(``model.onnx``: each new token one call on the whole sequence so far), at a few prompt lengths.

A random-init Llama (no download) of a small but not toy shape, LoRA on q/v merged as
`rosafx export RUN --merge` does it; both files exported from the same merged weights. Per
prompt length: the prompt call (prefill) and the median time per new token over
``--new-tokens`` tokens, interleaved rounds (cached, cache-less, cached, ...), medians over
rounds, after an untimed warm-up of each at that length (onnxruntime plans memory for a shape
the first time it sees it). Both must give the same greedy tokens (checked). onnxruntime on
the CPU with ``--threads`` intra-op threads.

    cd bench && HF_HUB_OFFLINE=1 ../.venv/bin/python decoder_latency.py [--prompts 16 128 512] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rosafx
from common import record, write_json
from rosafx.recipes.decoder_export import export_cached_decoder
from rosafx.recipes.generation import into_model
from rosafx.recipes.onnx_decoding import OnnxDecoder

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "decoder_latency.json"


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def session(path: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed_cached(decoder: OnnxDecoder, prompt: list[int], new: int) -> tuple[list[int], float, list[float]]:
    """(tokens, prefill seconds, seconds per decode step): the loop of OnnxDecoder.greedy, timed."""
    ids, state, tokens, steps = np.asarray([prompt], np.int64), decoder.empty_state(1), [], []
    for i in range(new):
        start = time.perf_counter()
        logits, state = decoder.step(ids, state)
        steps.append(time.perf_counter() - start)
        tokens.append(int(logits[0, -1].argmax()))
        ids = np.asarray([[tokens[-1]]], np.int64)
    return tokens, steps[0], steps[1:]


def timed_cacheless(sess, prompt: list[int], new: int) -> tuple[list[int], float, list[float]]:
    names = [i.name for i in sess.get_inputs()]
    seq, steps = list(prompt), []
    for _ in range(new):
        ids = np.asarray([seq], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        start = time.perf_counter()
        logits = sess.run(None, {n: feed[n] for n in names})[0]
        steps.append(time.perf_counter() - start)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):], steps[0], steps[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    model = build_model(args)
    q_v = {"q_proj": {"method": "lora", "rank": 8}, "v_proj": {"method": "lora", "rank": 8}}
    adapted = rosafx.transform(model, q_v)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        plain, cached = Path(folder) / "model.onnx", Path(folder) / "model_with_past.onnx"
        rosafx.export_onnx(adapted, plain, merge=True, compare_base=False, latency_repeats=0)
        export_cached_decoder(into_model(model, rosafx.merge(adapted)), cached)
        decoder = OnnxDecoder(cached)
        decoder.session = session(cached, args.threads)
        cacheless = session(plain, args.threads)
        for length in args.prompts:
            prompt = torch.randint(3, args.vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()
            rows = {"cached": [], "cacheless": []}
            timed_cached(decoder, prompt, 2)  # warm-up: onnxruntime plans memory for new shapes on first sight
            timed_cacheless(cacheless, prompt, 2)
            for _ in range(args.rounds):
                rows["cached"].append(timed_cached(decoder, prompt, args.new_tokens))
                rows["cacheless"].append(timed_cacheless(cacheless, prompt, args.new_tokens))
            tokens = {kind: runs[0][0] for kind, runs in rows.items()}
            if tokens["cached"] != tokens["cacheless"]:
                raise SystemExit(f"prompt {length}: cached and cache-less greedy tokens differ")
            row = {"prompt_tokens": length, "new_tokens": args.new_tokens, "distinct_tokens": len(set(tokens["cached"]))}
            for kind, runs in rows.items():
                row[f"{kind}_prefill_ms"] = statistics.median(r[1] for r in runs) * 1e3
                row[f"{kind}_per_token_ms"] = statistics.median(statistics.median(r[2]) for r in runs) * 1e3
                row[f"{kind}_per_token_spread_ms"] = [min(statistics.median(r[2]) for r in runs) * 1e3,
                                                      max(statistics.median(r[2]) for r in runs) * 1e3]
            row["speedup_per_token"] = row["cacheless_per_token_ms"] / row["cached_per_token_ms"]
            results.append(row)
            print(f"prompt {length:4d}: per new token cached {row['cached_per_token_ms']:.2f} ms, cache-less "
                  f"{row['cacheless_per_token_ms']:.2f} ms ({row['speedup_per_token']:.1f}x); prefill cached "
                  f"{row['cached_prefill_ms']:.1f} ms, cache-less {row['cacheless_prefill_ms']:.1f} ms", flush=True)
    params = sum(p.numel() for p in model.parameters())
    write_json(args.out, record(args, results, model=f"random Llama, {params / 1e6:.1f} M parameters",
                                onnxruntime_threads=args.threads))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
