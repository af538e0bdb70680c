"""ROSA vs LoRA at the same rank on an SST-2 subset with all-MiniLM-L6-v2.

rank 8 on every encoder linear (+ the fresh classifier head trained in full), AdamW, the
same learning rate and the same batches for both, trained by ``rosafx.fit``; ROSA resamples
every --resample-every steps (its ``resample_every`` option: fit runs the resample, which
also resets the factors' AdamW state). Validation: a held-apart fifth of --data (default: the
SST-2 sample in rosafx/recipes/data/samples; GLUE's dev set is not used).

    python bench/rosa_vs_lora.py [--data path/to/SST-2/train.tsv] [--steps 150]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import rosafx
from common import (ENCODER_LINEARS, SST2_SAMPLE, accuracy, batches, example_inputs, first, load_classifier,
                    plot_losses, record, sst2_split, train, write_json)


def run(method: str, args, train_examples, valid_examples) -> dict:
    model, tokenizer = load_classifier()
    config = {"method": method, "rank": args.rank}
    if method == "lora":
        config["alpha"] = args.rank  # scale 1, as ROSA's factors enter with scale 1
    else:
        config["resample_every"] = args.resample_every
    adapted = rosafx.transform(model, {ENCODER_LINEARS: config, "classifier": {"method": "full"}},
                               example_inputs=example_inputs(train_examples, tokenizer, args.max_length))
    valid = batches(valid_examples, tokenizer, 128, args.max_length)
    start = time.perf_counter()
    losses, _ = train(adapted, batches(train_examples, tokenizer, args.batch_size, args.max_length, shuffle=True),
                      args.steps, lr=args.lr, weight_decay=0.01)          # torch's AdamW default decay
    seconds = time.perf_counter() - start
    acc = accuracy(adapted, valid)
    merged_acc = accuracy(rosafx.merge(adapted), valid)
    print(f"{method:>5}: validation accuracy {acc:.3f} (merged {merged_acc:.3f}), final loss(20-step mean) "
          f"{sum(losses[-20:]) / len(losses[-20:]):.3f}, {seconds:.0f} s")
    return {"accuracy": acc, "merged_accuracy": merged_acc, "losses": losses, "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SST2_SAMPLE)
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--valid-rows", type=int, default=800)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--resample-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_examples, valid_examples = sst2_split(args.data)
    train_examples, valid_examples = first(train_examples, args.train_rows), first(valid_examples, args.valid_rows)
    results = {m: run(m, args, train_examples, valid_examples) for m in ("lora", "rosa")}
    write_json(args.out / "rosa_vs_lora.json", record(args, results))
    plot_losses(args.out / "rosa_vs_lora.png", {m: r["losses"] for m, r in results.items()},
                f"SST-2 subset, all-MiniLM-L6-v2, rank {args.rank}; dotted: ROSA resamples",
                labels={m: f"{m} (val acc {r['accuracy']:.3f})" for m, r in results.items()},
                marks=list(range(args.resample_every, args.steps, args.resample_every)))
    print(f"wrote {args.out / 'rosa_vs_lora.json'} and {args.out / 'rosa_vs_lora.png'}")


if __name__ == "__main__":
    main()
