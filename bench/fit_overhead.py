"""rosafx.fit's per-step overhead over a bare hand-written loop, side by side.

Same adapted model (all-MiniLM-L6-v2, LoRA r8 on query/key/value/attention.output.dense +
the classifier head in full), same pre-tokenised SST-2 sample batches, same AdamW and LR
schedule. Each repeat times N steps of the hand loop, then N steps of ``rosafx.fit``
(progress bar on, no run directory), alternating so drift on a shared machine hits both;
the figure is the median over repeats of fit's time / the hand loop's time. fit's time
includes everything it does per call (building its optimizer, life-cycle dispatch, the
bar). Also reported: the time to make one batch (padding/indexing) against a step.

    python bench/fit_overhead.py [--steps 20] [--repeats 5] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import rosafx
from common import SST2_SAMPLE, load_classifier
from rosafx.recipes.data import Batches, encode, examples_from, loss_for, model_inputs, read_table
from rosafx.training.optim import Optimization, adamw, lr_factor

ATTENTION_LINEARS = ("query", "key", "value", "attention.output.dense")  # as make demo


def hand_loop(model, batches, loss_fn, steps: int, lr: float) -> float:
    optimization = Optimization(adamw(lr), lr_factor("linear", steps, 0)).build(model)
    optimizer, scheduler = optimization.optimizer, optimization.scheduler
    model.train()
    start = time.perf_counter()
    iterator = iter(batches)
    for _ in range(steps):
        batch = next(iterator)
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return time.perf_counter() - start


def fit_loop(model, batches, loss_fn, steps: int, lr: float) -> float:
    start = time.perf_counter()
    rosafx.fit(model, batches, loss_fn, steps=steps, lr=lr, progress=True)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    examples = examples_from(read_table(SST2_SAMPLE))
    model, tokenizer = load_classifier()
    batches = Batches(encode(examples, tokenizer, args.max_length), args.batch_size, shuffle=True, seed=0)
    lora = {"method": "lora", "rank": 8}
    adapted = rosafx.transform(model, {**{t: lora for t in ATTENTION_LINEARS}, "classifier": {"method": "full"}},
                               example_inputs=model_inputs(next(iter(batches))))
    loss_fn = loss_for("classification")
    hand_loop(adapted, batches, loss_fn, 3, 1e-4)  # warm-up: allocator, kernels
    ratios, hand_times, fit_times = [], [], []
    for _ in range(args.repeats):
        hand = hand_loop(adapted, batches, loss_fn, args.steps, 1e-4)
        fitted = fit_loop(adapted, batches, loss_fn, args.steps, 1e-4)
        hand_times.append(hand / args.steps)
        fit_times.append(fitted / args.steps)
        ratios.append(fitted / hand)
    start = time.perf_counter()
    made = sum(1 for _ in zip(range(50), batches))
    batch_ms = (time.perf_counter() - start) / made * 1e3
    result = {"steps": args.steps, "repeats": args.repeats, "threads": args.threads, "batch_size": args.batch_size,
              "hand_ms_per_step": [round(t * 1e3, 2) for t in hand_times],
              "fit_ms_per_step": [round(t * 1e3, 2) for t in fit_times],
              "ratios": [round(r, 4) for r in ratios], "median_ratio": round(statistics.median(ratios), 4),
              "batch_making_ms": round(batch_ms, 3)}
    print(json.dumps(result, indent=2))
    print(f"fit / hand loop per step: median {result['median_ratio']:.3f} "
          f"({100 * (result['median_ratio'] - 1):+.1f} %); making a batch: {batch_ms:.2f} ms "
          f"vs a step of {statistics.median(hand_times) * 1e3:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
