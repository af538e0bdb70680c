"""Where a training step's time goes beyond the frozen floor: torch.profiler over a few
steps of one bench/train_step.py variant and of the floor, op by op (self CPU time).

    python bench/profile_step.py [--variant lora] [--steps 3] [--top 15] [--threads 1]
    python bench/profile_step.py --variant lora --shapes     # the variant alone, by op and input shapes

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


def by_shapes(step, steps: int, top: int) -> None:
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    print(f"{'op':<34} {'calls/step':>10} {'ms/step':>8}  input shapes")
    for e in events[:top]:
        print(f"{e.key[:34]:<34} {e.count / steps:>10.0f} {e.self_cpu_time_total / 1e3 / steps:>8.1f}  "
              f"{str(e.input_shapes)[:100]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shapes", action="store_true", help="the variant alone, grouped by input shapes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = load_base()
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    if args.shapes:
        by_shapes(VARIANTS[args.variant](base, ids, False)[0], args.steps, args.top)
        return
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
