"""LoRA vs LoRA-GA: training loss over the first steps on an SST-2 subset, all-MiniLM-L6-v2.

Every encoder linear adapted at the same rank and alpha, the fresh classifier head trained
in full, AdamW at one learning rate for every variant, the same batches in the same order
and the same head init. Variants:
  * lora          s = alpha/r      (LoRA's default)
  * lora-rslora   s = alpha/√r     (the scale LoRA-GA's paper convention uses)
  * lora-ga       paper convention (ArB2r, stable, γ = 16, s = alpha/√r), initialised by
                  rosafx.calibrate over --calib-batches batches of the training split
                  (not counted in the steps).
Validation: our own split of SST-2's train.tsv (GLUE's dev set is not used).

    python bench/lora_ga_convergence.py [--data ../shared/data/glue/SST-2/train.tsv] [--steps 200]
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

ENCODER_LINEARS = r"(?:.*\.)?encoder\.layer\.\d+\..*(query|key|value|dense)"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/glue/SST-2/train.tsv"
VARIANTS = {
    "lora": {"method": "lora"},
    "lora-rslora": {"method": "lora", "rslora": True},
    "lora-ga": {"method": "lora-ga"},
}


def run(name: str, args, train_rows, valid_rows) -> dict:
    torch.manual_seed(0)  # the same fresh head for every variant
    model, tokenizer = load_embedded_model()
    example, _ = next(batches(train_rows[:4], tokenizer, 4, args.max_length))
    config = {**VARIANTS[name], "rank": args.rank, "alpha": args.alpha}
    adapted = rosafx.transform(model, {ENCODER_LINEARS: config, "classifier": {"method": "full"}},
                               example_inputs=example)
    loss_fn = torch.nn.CrossEntropyLoss()
    adapted.train()
    calib_seconds = 0.0
    if name == "lora-ga":
        start = time.perf_counter()
        calib = list(batches(train_rows, tokenizer, args.batch_size, args.max_length, shuffle_seed=1000))
        calib = calib[: args.calib_batches]
        rosafx.calibrate(adapted, calib, lambda m, b: loss_fn(m(**b[0]).logits, b[1]), progress=False)
        calib_seconds = time.perf_counter() - start
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=args.lr)
    losses, step, epoch = [], 0, 0
    start = time.perf_counter()
    while step < args.steps:
        for inputs, labels in batches(train_rows, tokenizer, args.batch_size, args.max_length, shuffle_seed=epoch):
            loss = loss_fn(adapted(**inputs).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 25 == 0:
                print(f"{name} step {step}: loss {sum(losses[-25:]) / 25:.3f} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
            if step >= args.steps:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    acc = accuracy(adapted, valid_rows, tokenizer, args.max_length)
    merged_acc = accuracy(rosafx.merge(adapted), valid_rows, tokenizer, args.max_length)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    print(f"{name:>12}: val acc {acc:.4f} (merged {merged_acc:.4f}), loss first 20 {sum(losses[:20]) / 20:.3f}, "
          f"last 20 {sum(losses[-20:]) / 20:.3f}, train {seconds:.0f} s, calibrate {calib_seconds:.1f} s", flush=True)
    return {"config": config, "accuracy": acc, "merged_accuracy": merged_acc, "losses": losses,
            "train_seconds": seconds, "calibrate_seconds": calib_seconds, "trainable": trainable}


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
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
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
        rows = read_glue_tsv(args.data)[: args.rows]
        train_rows, valid_rows = split(rows, validation_fraction=0.2, seed=0)
        valid_rows = valid_rows[: args.valid_rows]
        results = {name: run(name, args, train_rows, valid_rows) for name in args.variants.split(",")}
    for threshold in (0.6, 0.5, 0.45, 0.4):
        for result in results.values():
            result.setdefault("steps_to_loss", {})[str(threshold)] = first_step_below(result["losses"], threshold)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU, no GPU, "
              f"{torch.get_num_threads()} threads", "args": {k: str(v) for k, v in vars(args).items()},
              "results": results}
    (args.out / f"{args.stem}.json").write_text(json.dumps(record, indent=1))
    for name, result in results.items():
        print(f"{name:>12}: steps to 10-step mean loss below {result['steps_to_loss']}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        losses = torch.tensor(result["losses"])
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], min(10, len(losses)), 1).flatten()
        ax.plot(range(10, 10 + len(smooth)), smooth, label=f"{name} (val acc {result['accuracy']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (trailing 10-step mean)")
    ax.set_title(f"SST-2 subset, all-MiniLM-L6-v2, rank {args.rank}, alpha {args.alpha:g}, lr {args.lr:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{args.stem}.png", dpi=110)
    print(f"wrote {args.out / f'{args.stem}.json'} and {args.out / f'{args.stem}.png'}")


if __name__ == "__main__":
    main()
