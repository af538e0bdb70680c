"""Carve a validation split out of a GLUE task's train.tsv, deterministically (the official
dev sets are not in ../shared on purpose). The output keeps the TSV layout byte for byte:
the header line (none for CoLA) and whole data lines, so `rosafx train` reads both files
exactly as it reads the original."""
from __future__ import annotations

import random
from pathlib import Path

HEADERLESS = {"CoLA"}  # CoLA's train.tsv has no header line


def data_lines(text: str, task: str) -> tuple[list[str], list[str]]:
    """(header lines, data lines) of a GLUE TSV; blank lines dropped."""
    lines = [line for line in text.split("\n") if line.strip()]
    return ([], lines) if task in HEADERLESS else (lines[:1], lines[1:])


def split_lines(lines: list[str], n_valid: int, n_train: int | None, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle line indices with ``seed``; the first ``n_valid`` are validation, the next
    ``n_train`` (all the rest when None) are training. Disjoint by index; each keeps file order."""
    if n_valid >= len(lines):
        raise ValueError(f"validation size {n_valid} leaves no training rows out of {len(lines)}")
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    valid = sorted(order[:n_valid])
    rest = order[n_valid:]
    train = sorted(rest if n_train is None else rest[:n_train])
    return [lines[i] for i in train], [lines[i] for i in valid]


def split_task(source: Path, out_dir: Path, task: str, n_valid: int, n_train: int | None, seed: int) -> dict:
    """Write out_dir/train.tsv and out_dir/valid.tsv (atomically); return their row counts."""
    text = source.read_bytes().decode("utf-8")  # MRPC's byte-order mark stays in its header line
    header, lines = data_lines(text, task)
    train, valid = split_lines(lines, n_valid, n_train, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", train), ("valid.tsv", valid)):
        tmp = out_dir / (name + ".tmp")
        tmp.write_bytes(("\n".join(header + rows) + "\n").encode("utf-8"))
        tmp.replace(out_dir / name)
    return {"source_rows": len(lines), "train_rows": len(train), "valid_rows": len(valid), "split_seed": seed}
