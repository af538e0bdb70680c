"""A quantized frozen base (QLoRA) against the fp32 base on all-MiniLM-L6-v2: bytes, memory, step time.

LoRA r8 (alpha 16) on the 36 encoder linears, the 2-way head trained in full, AdamW, one
batch of SST-2 sample sentences (B x L tokens). For the fp32 base and each scheme:

* resident bytes of the base linear weights: the 36 fp32 weights against their packed
  codes + scales (the quantized model no longer holds the fp32 copies);
* what a training step holds: the module's parameters and buffers, plus what its forward
  keeps alive for the backward (``rosafx.training.memory.live_activation_bytes``: every
  storage created in the forward and still alive when it returns, which includes a
  dequantized weight that autograd saved);
* step time (forward + backward + AdamW step), interleaved base by base, median (and
  minimum: on a loaded machine the least disturbed step) of the timed rounds after warm-up;
* the dequantization a step does (every packed weight twice: forward, and again in the
  backward), timed alone, minimum of 5, against the fp32 step's minimum;
* for the memory alone, ``nf4-saving-fp32``: nf4 with autograd keeping the dequantized
  weights for the backward (passes/quantize.py's saved-tensor hooks removed), what a
  training step would hold without them.

    cd bench && HF_HUB_OFFLINE=1 ../.venv/bin/python quantized_base.py [--rounds 7] [--batch 32] [--length 64]
        [--json ../docs/results/quantized_base.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import rosafx
from common import ENCODER_LINEARS, example_inputs, first, load_classifier, record, sst2_split, write_json, batches
from rosafx.graph.adapted_graph import quantized_weights
from rosafx.recipes.data import loss_for, model_inputs
from rosafx.training.memory import live_activation_bytes

BASES = ("fp32", "nf4", "int4", "int8")


def build(base: str, example):
    model, _ = load_classifier()
    rules = {ENCODER_LINEARS: {"method": "lora", "rank": 8, "alpha": 16}, "classifier": {"method": "full"}}
    adapted = rosafx.transform(model, rules, example_inputs=example, quantize=None if base == "fp32" else base)
    linear_bytes = sum(p.nbytes for n, p in model.named_parameters()
                       if n.endswith(".weight") and p.dim() == 2 and ".encoder.layer." in f".{n}")
    if base == "fp32":
        stored = linear_bytes
    else:
        stored = sum(b.nbytes for m in quantized_weights(adapted).values() for b in m.buffers()
                     if ".encoder.layer." in f".{m.weight_name}")
    return adapted.train(), linear_bytes, stored


def dequantize_ms(adapted) -> float:
    """Every packed weight dequantized twice (forward + backward), minimum of 5 repeats."""
    packed = list(quantized_weights(adapted).values())
    times = []
    for _ in range(5):
        started = time.perf_counter()
        for module in packed + packed:
            module()
        times.append((time.perf_counter() - started) * 1e3)
    return min(times)


def module_bytes(module) -> int:
    return sum(t.nbytes for t in list(module.parameters()) + list(module.buffers()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    _, tokenizer = load_classifier()
    train, _ = sst2_split()
    example = example_inputs(train, tokenizer, args.length)
    batch = next(iter(batches(first(train, args.batch), tokenizer, args.batch, args.length)))
    loss = loss_for("classification")
    print(f"load average {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} threads", flush=True)
    models, results = {}, {}
    for base in BASES + ("nf4-saving-fp32",):
        adapted, linear_bytes, stored = build(base.split("-")[0], example)
        if base == "nf4-saving-fp32":
            adapted._forward_pre_hooks.clear()  # no saving_packed around the forward
            adapted._forward_hooks.clear()
        optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)
        held, out = live_activation_bytes(lambda: loss(adapted, batch), adapted)
        out.backward()
        optimizer.zero_grad(set_to_none=True)
        models[base] = (adapted, optimizer)
        results[base] = {"base_linear_bytes": stored, "fp32_linear_bytes": linear_bytes,
                         "ratio_to_fp32": round(stored / linear_bytes, 4),
                         "module_bytes": module_bytes(adapted), "forward_holds_bytes": held,
                         "step_holds_bytes": module_bytes(adapted) + held, "step_ms": []}
        print(f"{base}: base linears {stored / 2**20:.1f} MiB ({stored / linear_bytes:.3f}x fp32), module "
              f"{module_bytes(adapted) / 2**20:.1f} MiB, forward holds {held / 2**20:.1f} MiB", flush=True)
        if base not in BASES:
            del models[base]
    for round_ in range(args.warmup + args.rounds):
        for base in BASES:
            adapted, optimizer = models[base]
            started = time.perf_counter()
            loss(adapted, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_ >= args.warmup:
                results[base]["step_ms"].append((time.perf_counter() - started) * 1e3)
    floor = statistics.median(results["fp32"]["step_ms"])
    fastest = min(results["fp32"]["step_ms"])
    for base in BASES:
        median = statistics.median(results[base]["step_ms"])
        results[base]["median_step_ms"] = round(median, 1)
        results[base]["step_vs_fp32"] = round(median / floor, 3)
        results[base]["min_step_ms"] = round(min(results[base]["step_ms"]), 1)
        results[base]["min_step_vs_fp32"] = round(min(results[base]["step_ms"]) / fastest, 3)
        if base != "fp32":
            results[base]["dequantize_ms_per_step"] = round(dequantize_ms(models[base][0]), 1)
            results[base]["dequantize_vs_fp32_min_step"] = round(results[base]["dequantize_ms_per_step"] / fastest, 3)
        results[base]["step_holds_vs_fp32"] = round(results[base]["step_holds_bytes"] /
                                                    results["fp32"]["step_holds_bytes"], 3)
        print(f"{base}: step {median:.0f} ms ({median / floor:.2f}x fp32; min {results[base]['min_step_vs_fp32']:.2f}x, "
              f"dequantizing {results[base].get('dequantize_ms_per_step', 0):.0f} ms), step holds "
              f"{results[base]['step_holds_bytes'] / 2**20:.1f} MiB ({results[base]['step_holds_vs_fp32']:.2f}x)")
    results["nf4-saving-fp32"].pop("step_ms")
    results["nf4-saving-fp32"]["step_holds_vs_fp32"] = round(results["nf4-saving-fp32"]["step_holds_bytes"] /
                                                             results["fp32"]["step_holds_bytes"], 3)
    print(f"nf4 without saving_packed: step holds {results['nf4-saving-fp32']['step_holds_bytes'] / 2**20:.1f} MiB "
          f"({results['nf4-saving-fp32']['step_holds_vs_fp32']:.2f}x); load average {os.getloadavg()[0]:.1f}")
    if args.json:
        write_json(args.json, record(args, results))


if __name__ == "__main__":
    main()
