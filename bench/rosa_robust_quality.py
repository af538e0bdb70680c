"""RoSA (rosa-robust) vs LoRA vs sparse-only at matched trainable parameters, SST-2 subset.

all-MiniLM-L6-v2 + a fresh 2-way head (AutoModelForSequenceClassification, the head trains
in full), every encoder linear adapted (36 sites). Budgets are matched exactly per layer:

    lora         rank 8                      8·(4·768 + 2·1920)            = 55,296 / layer
    rosa-robust  rank 4 + density 1.5625 %   4·6,912 + 4·2,304 + 2·9,216   = 55,296 / layer
    sparse-only  rank 0 + density 3.125 %    4·4,608 + 2·18,432            = 55,296 / layer

alpha = 2·rank, so s = 2 for every low-rank part. rosa-robust and sparse-only follow the
paper's restart flow: ``--warmup`` steps of the uncalibrated model (LoRA; head only for
rank 0), ``rosafx.calibrate`` over ``--calib`` batches, keep the masks, restart from the
pretrained weights (same head init) with those masks, train ``--steps`` steps. LoRA trains
``--steps`` steps. Same batches in the same order for all; AdamW; the sparse values get
``--sparse-lr`` (the paper uses a lower LR for S than for A, B), everything else ``--lr``.

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
from rosafx.demo import accuracy, batches, load_embedded_model
from rosafx.demo_data import read_glue_tsv, split
from rosafx.methods.rosa_robust import apply_masks, masks_of

SST2 = "/work/shared/data/glue/SST-2/train.tsv"
ENCODER_LINEARS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"
VARIANTS = {
    "lora": {"method": "lora", "rank": 8, "alpha": 16},
    "rosa-robust": {"method": "rosa-robust", "rank": 4, "alpha": 8, "density": 0.015625},
    "sparse-only": {"method": "rosa-robust", "rank": 0, "alpha": 0, "density": 0.03125},
}
LOW_RANK_OR_HEAD = ("lora_A", "lora_B", "classifier")


def build(config, example):
    model, _ = load_embedded_model()  # seeds 0 first: every variant gets the same head init
    return rosafx.transform(model, {ENCODER_LINEARS: config, "classifier": {"method": "full"}}, example_inputs=example)


def make_optimizer(adapted, lr, sparse_lr):
    dense, sparse = [], []
    for name, p in adapted.named_parameters():
        if p.requires_grad:
            (dense if any(k in name for k in LOW_RANK_OR_HEAD) else sparse).append(p)
    groups = [{"params": dense, "lr": lr}] + ([{"params": sparse, "lr": sparse_lr}] if sparse else [])
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train_batches(rows, tokenizer, args):
    epoch = 0
    while True:
        yield from batches(rows, tokenizer, args.batch, args.max_length, shuffle_seed=1000 + epoch)
        epoch += 1


def train(adapted, rows, tokenizer, args, steps):
    optimizer = make_optimizer(adapted, args.lr, args.sparse_lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    adapted.train()
    losses = []
    for step, (inputs, labels) in zip(range(steps), train_batches(rows, tokenizer, args)):
        loss = loss_fn(adapted(**inputs).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run_variant(name, config, rows, valid, tokenizer, example, args):
    start = time.perf_counter()
    adapted = build(config, example)
    if config["method"] == "rosa-robust":
        train(adapted, rows, tokenizer, args, args.warmup)                      # LoRA warm-up
        loss_fn = torch.nn.CrossEntropyLoss()
        calib = [b for _, b in zip(range(args.calib), batches(rows, tokenizer, args.batch, args.max_length,
                                                               shuffle_seed=7))]
        rosafx.calibrate(adapted, calib, lambda m, b: loss_fn(m(**b[0]).logits, b[1]), progress=False)
        masks = masks_of(adapted)                                               # save the masks
        adapted = build(config, example)                                        # restart from pretrained
        apply_masks(adapted, masks)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    losses = train(adapted, rows, tokenizer, args, args.steps) or [float("nan")]
    if args.timing_only:
        return {"trainable": trainable}, adapted
    acc = accuracy(adapted, valid, tokenizer, args.max_length)
    merged_acc = accuracy(rosafx.merge(adapted), valid, tokenizer, args.max_length)
    result = {"trainable": trainable, "accuracy": acc, "merged_accuracy": merged_acc,
              "final_loss_mean10": sum(losses[-10:]) / len(losses[-10:]), "seconds": time.perf_counter() - start}
    print(f"{name:12} trainable {trainable:,}  accuracy {acc:.4f} (merged {merged_acc:.4f})  "
          f"loss(last 10) {result['final_loss_mean10']:.3f}  {result['seconds']:.0f} s", flush=True)
    return result, adapted


def step_times(adapted_by_name, inputs, labels, repeats, steps):
    loss_fn = torch.nn.CrossEntropyLoss()
    closures = {}
    for name, adapted in adapted_by_name.items():
        optimizer = make_optimizer(adapted, 1e-6, 1e-6)
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
    parser.add_argument("--data", default=SST2)
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
    rows = read_glue_tsv(args.data)[: args.limit]
    train_rows, valid_rows = split(rows)
    valid_rows = valid_rows[: args.valid]
    _, tokenizer = load_embedded_model()
    example, _ = next(batches(train_rows[:4], tokenizer, 4, args.max_length))
    print(f"SST-2 subset: {len(train_rows)} train / {len(valid_rows)} validation rows; {args.steps} steps of "
          f"batch {args.batch}", flush=True)
    results, models = {}, {}
    for name, config in VARIANTS.items():
        results[name], models[name] = run_variant(name, config, train_rows, valid_rows, tokenizer, example, args)
    inputs = tokenizer([t for t, _ in train_rows[:32]], padding="max_length", truncation=True,
                       max_length=args.max_length, return_tensors="pt")
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    labels = torch.tensor([y for _, y in train_rows[:32]])
    times = step_times(models, inputs, labels, args.repeats, args.timing_steps)
    print(f"step time, batch 32 x {args.max_length} tokens, median of {args.repeats} interleaved repeats:")
    for name, t in times.items():
        print(f"  {name:12} {t * 1e3:7.0f} ms   {t / times['lora']:.2f}x lora")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                       "torch": torch.__version__, "args": vars(args), "variants": VARIANTS,
                       "results": results, "step_seconds": times}, f, indent=2)


if __name__ == "__main__":
    main()
