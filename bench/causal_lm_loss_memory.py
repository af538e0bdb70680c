"""Peak memory of the causal-LM loss (forward + backward) at a 32k vocabulary and 1,024 tokens:
the naive loss (``F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ...)``, what
rosafx/recipes/data/objectives.py computed before) against the chunked one it computes now
(rosafx/recipes/data/chunked_loss.py).

Each case runs in its own process: it makes the logits (batch x tokens x vocab, requiring
grad, as the captured graph returns them), reads its resident set, then runs the loss and its
backward (the gradient of the logits is what the model's backward would take next); the
parent reads the child's peak resident set (``os.wait4``, the kernel's ru_maxrss of that child
alone). "added" = peak - the resident set once the logits existed: what the loss itself costs.
The logits' own size is printed beside it.

    cd bench && HF_HUB_OFFLINE=1 ../.venv/bin/python causal_lm_loss_memory.py [--vocab 32000 --tokens 1024 --json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

CASES = [(loss, dtype) for dtype in ("float32", "bfloat16") for loss in ("naive", "chunked")]


def child(loss: str, dtype: str, batch: int, tokens: int, vocab: int) -> None:
    import torch
    import torch.nn.functional as F

    from rosafx.recipes.data.chunked_loss import next_token_loss
    torch.manual_seed(0)
    logits = torch.randn(batch, tokens, vocab, dtype=getattr(torch, dtype)).requires_grad_()
    labels = torch.randint(0, vocab, (batch, tokens))
    labels[:, : tokens // 4] = -100  # a prompt, as instruction data has
    base = rss_bytes()
    start = time.perf_counter()
    if loss == "naive":
        value = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    else:
        value = next_token_loss(logits, labels)
    value.backward()
    seconds = time.perf_counter() - start
    print(json.dumps({"base": base, "loss": float(value), "seconds": seconds,
                      "logits_bytes": logits.numel() * logits.element_size()}))


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(loss: str, dtype: str, args) -> dict:
    command = [sys.executable, __file__, "--child", loss, dtype, "--batch", str(args.batch), "--tokens",
               str(args.tokens), "--vocab", str(args.vocab)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env={**os.environ, "PYTHONSAFEPATH": "1"})
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"case {loss} {dtype} failed")
    record = json.loads(out.decode().strip().splitlines()[-1])
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    return {"loss_fn": loss, "dtype": dtype, "added_mib": (peak - record["base"]) / 2**20,
            "logits_mib": record["logits_bytes"] / 2**20, "seconds": record["seconds"], "value": record["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.batch, args.tokens, args.vocab)
    rows = [run_case(loss, dtype, args) for loss, dtype in CASES]
    print(f"batch {args.batch} x {args.tokens} tokens x vocab {args.vocab}; peak resident memory the loss adds "
          "(forward + backward) over the logits")
    for row in rows:
        print(f"{row['loss_fn']:>8} {row['dtype']:>9}: +{row['added_mib']:7.1f} MiB (logits {row['logits_mib']:.1f} "
              f"MiB), {row['seconds'] * 1000:.0f} ms, loss {row['value']:.4f}")
    if args.json:
        record = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                  "cpus": os.cpu_count(), "args": vars(args), "rows": rows}
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
