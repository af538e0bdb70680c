"""Per-layer activation checkpointing on all-MiniLM-L6-v2 at a long sequence: activation
memory and step time with and without (issue 13's target: <= 0.5x activation memory at
<= 1.35x step time). Modes: plain; "full" (every op of a layer recomputed); "attention"
(the fused attention kernels' outputs kept, the rest recomputed).

LoRA rank 8, alpha 16 on the 36 encoder linears; batch 8 x 512 tokens (random ids, no
padding); dropout as the model ships it (0.1, on: the recompute must replay it); loss =
mean square of the last hidden state; AdamW. One training step = forward, backward,
optimizer step.

* activation memory: bytes of the distinct storages one forward keeps for its backward,
  parameters left out, two ways (rosafx/training/memory.py): saved-tensor hooks (the layer inputs
  checkpointing keeps are counted; what selective checkpointing keeps is not seen) and
  live storages created by the forward's operators (sees everything); deterministic;
* peak RSS: cross-check, in a fresh child process per mode: the growth of the process's
  peak resident set (``ru_maxrss``) over one training step, after the model was built and a
  short warm-up step ran (so the growth is activations, gradients and workspace);
* step time: the two modes interleaved repeat after repeat (order alternating), medians
  with the 25th-75th percentile; the ratio is the median of the per-repeat ratios. Wall
  time and the process's CPU time are both reported: on a shared machine the CPU time is
  the steadier measure of the work a step does. One torch thread by default (--threads).

    python bench/grad_checkpoint.py [--repeats 5] [--batch 8] [--seq 512] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import rosafx
from common import ENCODER_LINEARS, load_encoder
from rosafx.training.activation_checkpointing import GradCheckpointed
from rosafx.training.memory import live_activation_bytes, saved_activation_bytes

LORA = {"method": "lora", "rank": 8, "alpha": 16}
MODES = ("plain", "full", "attention")


def build(batch: int, seq: int):
    base, _ = load_encoder()
    adapted = rosafx.transform(base, {ENCODER_LINEARS: LORA})
    adapted.train()
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)
    models = {"plain": adapted, "full": GradCheckpointed(adapted, "full"),
              "attention": GradCheckpointed(adapted, "attention")}
    return adapted, models, ids, optimizer


def loss_of(model, ids):
    return model(input_ids=ids).last_hidden_state.pow(2).mean()


def step(model, ids, optimizer) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one training step."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss_of(model, ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def quartiles(values):
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2]}


def rss_child(mode: str, batch: int, seq: int) -> dict:
    """In this (fresh) process: peak-RSS growth over one training step of ``mode``."""
    adapted, models, ids, optimizer = build(batch, seq)
    step(models[mode], ids[:1, :16], optimizer)  # warm-up: libraries, optimizer state
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(models[mode], ids, optimizer)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "peak_rss_before": before, "peak_rss_after": after, "peak_rss_growth": after - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--rss-child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.batch, args.seq)))
        return

    rss = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--rss-child", mode, "--batch", str(args.batch),
                              "--seq", str(args.seq), "--threads", str(args.threads)], capture_output=True, text=True, check=True).stdout
        rss[mode] = json.loads(out.strip().splitlines()[-1])

    adapted, models, ids, optimizer = build(args.batch, args.seq)
    saved, live = {}, {}
    for mode in MODES:
        saved[mode], loss = saved_activation_bytes(lambda: loss_of(models[mode], ids), adapted)
        loss.backward()
        live[mode], loss = live_activation_bytes(lambda: loss_of(models[mode], ids), adapted)
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
        print(f"{mode}: saved {saved[mode] / 2**20:.1f} MiB, live {live[mode] / 2**20:.1f} MiB", file=sys.stderr,
              flush=True)

    times = {(mode, clock): [] for mode in MODES for clock in ("wall", "cpu")}
    ratios = {(mode, clock): [] for mode in MODES[1:] for clock in ("wall", "cpu")}
    step(models["plain"], ids, optimizer)  # warm-up
    for repeat in range(args.repeats):
        order = MODES[repeat % len(MODES):] + MODES[:repeat % len(MODES)]  # each mode takes each place
        for mode in order:
            wall, cpu = step(models[mode], ids, optimizer)
            times[mode, "wall"].append(wall)
            times[mode, "cpu"].append(cpu)
        for mode, clock in ratios:
            ratios[mode, clock].append(times[mode, clock][-1] / times["plain", clock][-1])
        print(f"repeat {repeat + 1}/{args.repeats}: " + "; ".join(
            f"{m} wall {times[m, 'wall'][-1]:.2f} s cpu {times[m, 'cpu'][-1]:.2f} s" for m in MODES),
            file=sys.stderr, flush=True)

    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(), "batch": args.batch,
        "seq": args.seq, "repeats": args.repeats, "layers": GradCheckpointed(adapted).layers(),
        "saved_bytes": saved, "live_bytes": live,
        "live_ratio": {m: live[m] / live["plain"] for m in MODES[1:]},
        "saved_ratio": {m: saved[m] / saved["plain"] for m in MODES[1:]},
        "peak_rss_growth": {m: rss[m]["peak_rss_growth"] for m in MODES},
        "peak_rss_growth_ratio": {m: rss[m]["peak_rss_growth"] / rss["plain"]["peak_rss_growth"] for m in MODES[1:]},
        "step_seconds": {f"{m}_{c}": quartiles(times[m, c]) for m in MODES for c in ("wall", "cpu")},
        "step_ratio": {f"{m}_{c}": quartiles(r) for (m, c), r in ratios.items()},
        "step_seconds_raw": {f"{m}_{c}": v for (m, c), v in times.items()},
    }
    result["target_met"] = {f"{m}_{c}": result["live_ratio"][m] <= 0.5
                            and result["step_ratio"][f"{m}_{c}"]["median"] <= 1.35 for (m, c) in ratios}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
