"""RoSA (rosa-robust) vs LoRA vs sparse-only at matched trainable parameters, SST-2 subset.

all-MiniLM-L6-v2 + a fresh 2-way head (AutoModelForSequenceClassification, the head trains
in full), every encoder linear adapted (36 sites). Budgets are matched exactly per layer:

    lora         rank 8                      8·(4·768 + 2·1920)            = 55,296 / layer
    rosa-robust  rank 4 + density 1.5625 %   4·6,912 + 4·2,304 + 2·9,216   = 55,296 / layer
    sparse-only  rank 0 + density 3.125 %    4·4,608 + 2·18,432            = 55,296 / layer

alpha = 2·rank, so s = 2 for every low-rank part. rosa-robust and sparse-only follow the
paper's restart flow: ``--warmup`` steps of the uncalibrated model (LoRA; head only for
rank 0), then the method's own mask schedule in ``rosafx.fit`` (``mask_warmup_steps``)
calibrates over ``--calib`` training batches; keep the masks (the one step fit takes after
them is discarded), restart from the pretrained weights (same head init) with those masks,
train ``--steps`` steps. LoRA trains ``--steps`` steps. All training runs through
``rosafx.fit`` at a constant LR; same batches in the same order for all; AdamW; the sparse
values get ``--sparse-lr`` (the paper uses a lower LR for S than for A, B), everything else
``--lr``. Data: --data (default: the SST-2 sample in rosafx/recipes/data/samples).

Step time: after the runs, one training step per variant on the same fixed batch, the
variants interleaved repeat after repeat, medians compared (the machine is shared).

    python bench/rosa_robust_quality.py [--steps 200] [--batch 16] [--json FILE]
    python bench/rosa_robust_quality.py --timing-only [--repeats 7]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

import rosafx
from common import (ENCODER_LINEARS, SST2_SAMPLE, accuracy, batches, example_inputs, first, load_classifier,
                    sst2_split, train, trainable)
from rosafx.methods.rosa_robust import apply_masks, masks_of
VARIANTS = {
    "lora": {"method": "lora", "rank": 8, "alpha": 16},
    "rosa-robust": {"method": "rosa-robust", "rank": 4, "alpha": 8, "density": 0.015625},
    "sparse-only": {"method": "rosa-robust", "rank": 0, "alpha": 0, "density": 0.03125},
}
LOW_RANK_OR_HEAD = ("lora_A", "lora_B", "classifier")


def build(config, example):
    model, _ = load_classifier()  # seeded: every variant gets the same head init
    return rosafx.transform(model, {ENCODER_LINEARS: config, "classifier": {"method": "full"}}, example_inputs=example)


def optimizer_for(adapted, lr, sparse_lr):
    """An optimizer builder for rosafx.fit: the sparse values get ``sparse_lr``. It looks the
    names up when called, since fit rebuilds its optimizer once the masks replace them."""
    def make(params):
        names = {id(p): name for name, p in adapted.named_parameters()}
        dense = [p for p in params if any(k in names[id(p)] for k in LOW_RANK_OR_HEAD)]
        sparse = [p for p in params if not any(k in names[id(p)] for k in LOW_RANK_OR_HEAD)]
        groups = [{"params": dense, "lr": lr}] + ([{"params": sparse, "lr": sparse_lr}] if sparse else [])
        return torch.optim.AdamW(groups, weight_decay=0.0)
    return make


def run_variant(name, config, train_examples, valid_examples, tokenizer, example, args):
    start = time.perf_counter()
    train_batches = batches(train_examples, tokenizer, args.batch, args.max_length, shuffle=True, seed=1000)
    optimizer = lambda a: optimizer_for(a, args.lr, args.sparse_lr)  # noqa: E731
    if config["method"] == "rosa-robust":
        warmup = {**config, "mask_warmup_steps": args.warmup}
        adapted = build(warmup, example)                                  # LoRA warm-up, then fit builds the masks
        train(adapted, train_batches, args.warmup + 1, lr=args.lr, optimizer=optimizer(adapted),
              calibration_batches=args.calib)
        masks = masks_of(adapted)                                         # keep the masks
        adapted = build(config, example)                                  # restart from pretrained
        apply_masks(adapted, masks)
    else:
        adapted = build(config, example)
    losses = [float("nan")]
    if args.steps:
        losses, _ = train(adapted, train_batches, args.steps, lr=args.lr, optimizer=optimizer(adapted))
    if args.timing_only:
        return {"trainable": trainable(adapted)}, adapted
    valid = batches(valid_examples, tokenizer, 128, args.max_length)
    acc = accuracy(adapted, valid)
    merged_acc = accuracy(rosafx.merge(adapted), valid)
    result = {"trainable": trainable(adapted), "accuracy": acc, "merged_accuracy": merged_acc,
              "final_loss_mean10": sum(losses[-10:]) / len(losses[-10:]), "seconds": time.perf_counter() - start}
    print(f"{name:12} trainable {result['trainable']:,}  accuracy {acc:.4f} (merged {merged_acc:.4f})  "
          f"loss(last 10) {result['final_loss_mean10']:.3f}  {result['seconds']:.0f} s", flush=True)
    return result, adapted


def step_times(adapted_by_name, inputs, labels, repeats, steps):
    loss_fn = torch.nn.CrossEntropyLoss()
    closures = {}
    for name, adapted in adapted_by_name.items():
        optimizer = optimizer_for(adapted, 1e-6, 1e-6)([p for p in adapted.parameters() if p.requires_grad])
        adapted.train()

        def step(adapted=adapted, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(adapted(**inputs).logits, labels).backward()
            optimizer.step()
        step()  # warm
        closures[name] = step
    samples = {name: [] for name in closures}
    for _ in range(repeats):
        for name, step in closures.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            samples[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=SST2_SAMPLE)
    parser.add_argument("--limit", type=int, default=6000, help="rows of the TSV used (80 %% train / 20 %% validation)")
    parser.add_argument("--valid", type=int, default=600, help="validation rows evaluated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--sparse-lr", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats")
    parser.add_argument("--timing-steps", type=int, default=2)
    parser.add_argument("--timing-only", action="store_true",
                        help="skip training and evaluation (masks from --calib batches, no warm-up)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.timing_only:
        args.steps, args.warmup = 0, 0
    torch.set_num_threads(2)
    train_examples, valid_examples = sst2_split(args.data, args.limit)
    valid_examples = first(valid_examples, args.valid)
    _, tokenizer = load_classifier()
    example = example_inputs(train_examples, tokenizer, args.max_length)
    print(f"SST-2 subset: {len(train_examples)} train / {len(valid_examples)} validation rows; {args.steps} steps "
          f"of batch {args.batch}", flush=True)
    results, models = {}, {}
    for name, config in VARIANTS.items():
        results[name], models[name] = run_variant(name, config, train_examples, valid_examples, tokenizer, example,
                                                  args)
    inputs = tokenizer(train_examples.texts[:32], padding="max_length", truncation=True,
                       max_length=args.max_length, return_tensors="pt")
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = torch.tensor(train_examples.labels[:32])
    times = step_times(models, inputs, labels, args.repeats, args.timing_steps)
    print(f"step time, batch 32 x {args.max_length} tokens, median of {args.repeats} interleaved repeats:")
    for name, t in times.items():
        print(f"  {name:12} {t * 1e3:7.0f} ms   {t / times['lora']:.2f}x lora")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                       "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "variants": VARIANTS,
                       "results": results, "step_seconds": times}, f, indent=2)


if __name__ == "__main__":
    main()
