"""LoRA vs LoRA-GA: training loss over the first steps on an SST-2 subset, all-MiniLM-L6-v2.

Every encoder linear adapted at the same rank and alpha, the fresh classifier head trained
in full, AdamW at one learning rate for every variant, the same batches in the same order
and the same head init. Variants:
  * lora          s = alpha/r      (LoRA's default)
  * lora-rslora   s = alpha/√r     (the scale LoRA-GA's paper convention uses)
  * lora-ga       paper convention (ArB2r, stable, γ = 16, s = alpha/√r), initialised by
                  rosafx.calibrate over --calib-batches batches of the training split
                  (not counted in the steps).
Training runs through ``rosafx.fit`` at a constant LR. Validation: a held-apart fifth of
--data (default: the SST-2 sample in rosafx/recipes/data/samples; GLUE's dev set is not used).

    python bench/lora_ga_convergence.py [--data path/to/SST-2/train.tsv] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rosafx
from common import (ENCODER_LINEARS, SST2_SAMPLE, TASK, accuracy, batches, example_inputs, first, load_classifier,
                    plot_losses, record, sst2_split, train, trainable, write_json)
from rosafx.recipes.data import loss_for
VARIANTS = {
    "lora": {"method": "lora"},
    "lora-rslora": {"method": "lora", "rslora": True},
    "lora-ga": {"method": "lora-ga"},
}


def run(name: str, args, train_examples, valid_examples) -> dict:
    model, tokenizer = load_classifier()  # seeded: the same fresh head for every variant
    config = {**VARIANTS[name], "rank": args.rank, "alpha": args.alpha}
    adapted = rosafx.transform(model, {ENCODER_LINEARS: config, "classifier": {"method": "full"}},
                               example_inputs=example_inputs(train_examples, tokenizer, args.max_length))
    train_batches = batches(train_examples, tokenizer, args.batch_size, args.max_length, shuffle=True)
    calib_seconds = 0.0
    if name == "lora-ga":  # calibrated here, so its time is reported apart (fit then finds it done)
        start = time.perf_counter()
        calib = batches(train_examples, tokenizer, args.batch_size, args.max_length, shuffle=True, seed=1000)
        adapted.train()
        rosafx.calibrate(adapted, [b for _, b in zip(range(args.calib_batches), calib)], loss_for(TASK),
                         progress=False)
        calib_seconds = time.perf_counter() - start
    start = time.perf_counter()
    losses, _ = train(adapted, train_batches, args.steps, lr=args.lr, weight_decay=0.01)  # torch's AdamW default
    seconds = time.perf_counter() - start
    valid = batches(valid_examples, tokenizer, 128, args.max_length)
    acc = accuracy(adapted, valid)
    merged_acc = accuracy(rosafx.merge(adapted), valid)
    print(f"{name:>12}: val acc {acc:.4f} (merged {merged_acc:.4f}), loss first 20 {sum(losses[:20]) / 20:.3f}, "
          f"last 20 {sum(losses[-20:]) / 20:.3f}, train {seconds:.0f} s, calibrate {calib_seconds:.1f} s", flush=True)
    return {"config": config, "accuracy": acc, "merged_accuracy": merged_acc, "losses": losses,
            "train_seconds": seconds, "calibrate_seconds": calib_seconds, "trainable": trainable(adapted)}


def first_step_below(losses: list[float], threshold: float, window: int = 10) -> int | None:
    """First step at which the trailing ``window``-step mean loss is below ``threshold``."""
    for i in range(window, len(losses) + 1):
        if sum(losses[i - window:i]) / window < threshold:
            return i
    return None


def _parse(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SST2_SAMPLE)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--valid-rows", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--stem", default="lora_ga_convergence", help="file name of the JSON and PNG written")
    parser.add_argument("--combine", type=Path, nargs="*", default=None,
                        help="instead of training: merge the results of earlier runs (one variant each, run "
                             "side by side) into one record and plot")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.combine:
        records = [json.loads(p.read_text()) for p in args.combine]
        results = {k: v for r in records for k, v in r["results"].items()}
        args = argparse.Namespace(**{**vars(args), **{k: _parse(v) for k, v in records[0]["args"].items()
                                                      if k not in ("out", "combine", "variants", "stem")}})
    else:
        train_examples, valid_examples = sst2_split(args.data, args.rows)
        valid_examples = first(valid_examples, args.valid_rows)
        results = {name: run(name, args, train_examples, valid_examples) for name in args.variants.split(",")}
    for threshold in (0.6, 0.5, 0.45, 0.4):
        for result in results.values():
            result.setdefault("steps_to_loss", {})[str(threshold)] = first_step_below(result["losses"], threshold)
    write_json(args.out / f"{args.stem}.json", record(args, results))
    for name, result in results.items():
        print(f"{name:>12}: steps to 10-step mean loss below {result['steps_to_loss']}")
    plot_losses(args.out / f"{args.stem}.png", {n: r["losses"] for n, r in results.items()},
                f"SST-2 subset, all-MiniLM-L6-v2, rank {args.rank}, alpha {args.alpha:g}, lr {args.lr:g}",
                labels={n: f"{n} (val acc {r['accuracy']:.3f})" for n, r in results.items()})
    print(f"wrote {args.out / f'{args.stem}.json'} and {args.out / f'{args.stem}.png'}")


if __name__ == "__main__":
    main()
