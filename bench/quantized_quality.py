"""SST-2 held-apart accuracy of LoRA on a quantized base against the fp32 base, at the demo's budget.

The recipe is `make demo`'s (rosafx/recipes/demo.py): all-MiniLM-L6-v2 with a fresh 2-way
head trained in full, LoRA r8 on query, key, value and attention.output.dense, the 4,000-row
SST-2 sample split 80/20 (held_apart, seed 0), batch 32, length 64, lr 1e-3 with 10 %
warm-up, 250 steps. The only change between variants is ``quantize``.

    cd bench && HF_HUB_OFFLINE=1 ../.venv/bin/python quantized_quality.py [--bases fp32,nf4] [--steps 250]
        [--seeds 0] [--json ../docs/results/quantized_quality.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import rosafx
from common import record, write_json
from rosafx.recipes.data import SAMPLES, Batches, TaskMetrics, encode, examples_from, loss_for, model_inputs, read_table
from rosafx.recipes.data.examples import held_apart
from rosafx.recipes.demo import TARGETS, load_embedded_model


def run(base: str, seed: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    examples = examples_from(read_table(Path(SAMPLES) / "sst2_sample.tsv"))
    train_examples, valid_examples = held_apart(examples, 0.2, seed=0)
    model, tokenizer = load_embedded_model()
    torch.manual_seed(seed)
    train = Batches(encode(train_examples, tokenizer, 64), 32, shuffle=True, seed=seed)
    valid = Batches(encode(valid_examples, tokenizer, 64), 128)
    rules = {**{target: {"method": "lora", "rank": 8} for target in TARGETS}, "classifier": {"method": "full"}}
    adapted = rosafx.transform(model, rules, example_inputs=model_inputs(valid.batch(torch.arange(2))),
                               quantize=None if base == "fp32" else base)
    metrics = TaskMetrics(examples.task)
    started = time.perf_counter()
    history = rosafx.fit(adapted, train, loss_for(examples.task), steps=steps, lr=1e-3, warmup_ratio=0.1,
                         eval_batches=valid, metrics=metrics, progress=False)
    accuracy = history.evals[-1]["eval_accuracy"]
    merged = rosafx.evaluate(rosafx.merge(adapted), valid, metrics=metrics, progress=False)["eval_accuracy"]
    return {"accuracy": accuracy, "merged_accuracy": merged, "train_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default="fp32,nf4")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for base in args.bases.split(","):
            results[f"{base}/seed{seed}"] = result = run(base, seed, args.steps, args.threads)
            print(f"{base} seed {seed}: accuracy {result['accuracy']:.4f} (merged {result['merged_accuracy']:.4f}), "
                  f"{result['train_s']} s", flush=True)
            if args.json:
                write_json(args.json, record(args, results))


if __name__ == "__main__":
    main()
