"""Time of a full ROSA resample of all-MiniLM-L6-v2 (every encoder linear, rank 8).

Sites of the same shape (24 of 384x384, 6 of 1536x384, 6 of 384x1536) share one batched SVD.

    python bench/rosa_resample_time.py [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rosafx
from common import ENCODER_LINEARS, load_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_encoder()
    start = time.perf_counter()
    adapted = rosafx.transform(model, {ENCODER_LINEARS: {"method": "rosa", "rank": args.rank}})
    print(f"transform (capture + {len(adapted.meta['rosafx']['sites'])} sites factorised): "
          f"{time.perf_counter() - start:.2f} s")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rosafx.resample(adapted)
        times.append(time.perf_counter() - start)
    print(f"full resample: median {statistics.median(times):.2f} s over {args.repeats} "
          f"({', '.join(f'{t:.2f}' for t in times)}), {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
