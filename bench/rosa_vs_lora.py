"""ROSA vs LoRA at the same rank on an SST-2 subset with all-MiniLM-L6-v2.

rank 8 on every encoder linear (+ the fresh classifier head trained in full), AdamW, the
same learning rate and the same batches for both; ROSA resamples every --resample-every
steps (rosafx.training.ResampleEvery, which also resets the factors' AdamW state).
Validation: our own split of SST-2's train.tsv (GLUE's dev set is not used).

    python bench/rosa_vs_lora.py [--data ../shared/data/glue/SST-2/train.tsv] [--steps 150]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import rosafx
from rosafx.demo import accuracy, batches, load_embedded_model
from rosafx.demo_data import read_glue_tsv, split
from rosafx.training import ResampleEvery

ENCODER_LINEARS = r"(?:.*\.)?encoder\.layer\.\d+\..*(query|key|value|dense)"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/glue/SST-2/train.tsv"


def run(method: str, args, train_rows, valid_rows) -> dict:
    model, tokenizer = load_embedded_model()
    example, _ = next(batches(train_rows[:4], tokenizer, 4, args.max_length))
    config = {"method": method, "rank": args.rank}
    if method == "lora":
        config["alpha"] = args.rank  # scale 1, as ROSA's factors enter with scale 1
    adapted = rosafx.transform(model, {ENCODER_LINEARS: config, "classifier": {"method": "full"}},
                               example_inputs=example)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=args.lr)
    schedule = ResampleEvery(args.resample_every) if method == "rosa" else None
    loss_fn, losses, step, epoch = torch.nn.CrossEntropyLoss(), [], 0, 0
    start = time.perf_counter()
    adapted.train()
    while step < args.steps:
        for inputs, labels in batches(train_rows, tokenizer, args.batch_size, args.max_length, shuffle_seed=epoch):
            loss = loss_fn(adapted(**inputs).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step(adapted, optimizer)
            losses.append(loss.item())
            step += 1
            if step >= args.steps:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    acc = accuracy(adapted, valid_rows, tokenizer, args.max_length)
    merged_acc = accuracy(rosafx.merge(adapted), valid_rows, tokenizer, args.max_length)
    print(f"{method:>5}: validation accuracy {acc:.3f} (merged {merged_acc:.3f}), final loss(20-step mean) "
          f"{sum(losses[-20:]) / 20:.3f}, {seconds:.0f} s")
    return {"accuracy": acc, "merged_accuracy": merged_acc, "losses": losses, "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
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
    rows = read_glue_tsv(args.data)
    train_rows, valid_rows = split(rows, validation_fraction=0.2, seed=0)
    train_rows, valid_rows = train_rows[: args.train_rows], valid_rows[: args.valid_rows]
    results = {m: run(m, args, train_rows, valid_rows) for m in ("lora", "rosa")}
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU, "
              f"{torch.get_num_threads()} threads", "args": {k: str(v) for k, v in vars(args).items()},
              "results": results}
    (args.out / "rosa_vs_lora.json").write_text(json.dumps(record, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, result in results.items():
        losses = torch.tensor(result["losses"])
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], 10, 1).flatten()
        ax.plot(range(len(smooth)), smooth, label=f"{method} (val acc {result['accuracy']:.3f})")
    for s in range(args.resample_every, args.steps, args.resample_every):
        ax.axvline(s, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title(f"SST-2 subset, all-MiniLM-L6-v2, rank {args.rank}; dotted: ROSA resamples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "rosa_vs_lora.png", dpi=110)
    print(f"wrote {args.out / 'rosa_vs_lora.json'} and {args.out / 'rosa_vs_lora.png'}")


if __name__ == "__main__":
    main()
