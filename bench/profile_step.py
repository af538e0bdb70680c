"""Where a training step's time goes beyond the frozen floor: torch.profiler over a few
steps of one bench/train_step.py variant and of the floor, op by op (self CPU time).

    python bench/profile_step.py [--variant lora] [--steps 3] [--top 15]

Prints, for the ops whose total differs most, the floor's and the variant's self CPU ms
per step; the profiler's own overhead inflates small ops, so read the big rows.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from train_step import VARIANTS, load_base


def self_ms_per_step(step, steps: int) -> dict[str, float]:
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3 / steps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_base()
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    floor = self_ms_per_step(VARIANTS["floor"](base, ids, False)[0], args.steps)
    ours = self_ms_per_step(VARIANTS[args.variant](base, ids, False)[0], args.steps)
    keys = sorted(set(floor) | set(ours), key=lambda k: -abs(ours.get(k, 0.0) - floor.get(k, 0.0)))
    print(f"{'op':<48} {'floor ms':>9} {args.variant + ' ms':>12} {'difference':>11}")
    for key in keys[: args.top]:
        f, o = floor.get(key, 0.0), ours.get(key, 0.0)
        print(f"{key[:48]:<48} {f:>9.1f} {o:>12.1f} {o - f:>+11.1f}")
    print(f"{'total (self CPU, all ops)':<48} {sum(floor.values()):>9.1f} {sum(ours.values()):>12.1f} "
          f"{sum(ours.values()) - sum(floor.values()):>+11.1f}")


if __name__ == "__main__":
    main()
