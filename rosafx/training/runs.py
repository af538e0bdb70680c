"""A RUN directory: what ``rosafx.fit`` leaves behind and resumes from.

    RUN/run.json            the resolved configuration (the CLI writes it; a run repeats from it)
    RUN/source.json         the base model (as in `rosafx adapt` output)
    RUN/adapter/            the trained adapter: rosafx.json + adapter.safetensors (rosafx.load reads it)
    RUN/best/               the adapter at the best evaluation, when a metric is chosen
    RUN/metrics.jsonl       one line per step (step, epoch, loss, lr, time) and per evaluation
    RUN/plot.png            loss and evaluation metrics against the step (needs matplotlib)
    RUN/checkpoints/step-N/ adapter + state.pt (optimizer, schedule, RNG, data position, method state)

Every directory is written under a temporary name and renamed when complete, so a kill -9
at any moment leaves the last complete checkpoint usable; ``latest_checkpoint`` ignores the
temporaries.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from rosafx.io.atomic import atomic_directory, atomic_file, remove_atomically
from rosafx.errors import RosafxError
from rosafx.io.reading import read_json

CHECKPOINTS, ADAPTER, BEST = "checkpoints", "adapter", "best"
METRICS, PLOT, CONFIG, STATE = "metrics.jsonl", "plot.png", "run.json", "state.pt"
STEP_DIR = re.compile(r"step-(\d+)")


class Run:
    def __init__(self, path, keep_checkpoints: int = 2):
        self.path = Path(path)
        self.keep_checkpoints = keep_checkpoints

    # metrics
    def log(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / METRICS).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        path = self.path / METRICS
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything before it is whole
        return records

    def truncate_metrics(self, step: int) -> list[dict]:
        """Drop what a killed run logged after the checkpoint it resumes from."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        with atomic_file(self.path / METRICS) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    # adapters and checkpoints
    def save_adapter(self, model, name: str = ADAPTER) -> None:
        from rosafx.pipeline.serialize import write_adapter
        with atomic_directory(self.path / name) as tmp:
            write_adapter(model, tmp)

    def save_checkpoint(self, step: int, model, state: dict) -> Path:
        from rosafx.pipeline.serialize import write_adapter
        target = self.path / CHECKPOINTS / f"step-{step:08d}"
        with atomic_directory(target) as tmp:
            write_adapter(model, tmp)
            torch.save(state, tmp / STATE)
        for old in self.checkpoints()[:-self.keep_checkpoints]:
            remove_atomically(old)  # a kill mid-delete leaves a hidden leftover, never a half checkpoint
        return target

    def checkpoints(self) -> list[Path]:
        folder = self.path / CHECKPOINTS
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / STATE).exists()]
        return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    @staticmethod
    def load_checkpoint(path: Path) -> tuple[dict, dict]:
        """(adapter tensors, loop state) of one checkpoint directory."""
        from rosafx.pipeline.serialize import TENSORS_NAME
        try:
            state = torch.load(path / STATE, weights_only=True, map_location="cpu")
            tensors = load_file(str(path / TENSORS_NAME))
        except Exception as exc:  # a damaged checkpoint: say which, do not guess
            raise RosafxError(f"Cannot read checkpoint {path}: {exc}. Delete it to resume from the one before.") from exc
        return tensors, state

    # plot
    def plot(self) -> Path | None:
        """Loss and evaluation metrics against the step; skipped without matplotlib."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        records = self.records()
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if any(k.startswith("eval_") for k in r)]
        names = sorted({k for r in evals for k in r if k.startswith("eval_")})
        fig, axes = plt.subplots(1, 1 + bool(names), figsize=(11 if names else 6, 4), squeeze=False)
        axes[0][0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
        axes[0][0].set(xlabel="step", ylabel="training loss", title="loss")
        for name in names:
            points = [(r["step"], r[name]) for r in evals if name in r]
            axes[0][-1].plot(*zip(*points), marker="o", label=name)
        if names:
            axes[0][-1].set(xlabel="step", title="evaluation")
            axes[0][-1].legend()
        fig.tight_layout()
        with atomic_file(self.path / PLOT) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        return self.path / PLOT


RUN_FORMAT = "rosafx-run"


def is_run(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_run(path) -> dict:
    path = Path(path)
    if not is_run(path):
        raise RosafxError(f"{path} is not a rosafx run directory (no {CONFIG}); `rosafx train ... -o RUN` makes one.")
    record = read_json(path / CONFIG, "the run record")  # a damaged file: one line naming it
    if record.get("format") != RUN_FORMAT:
        raise RosafxError(f"{path / CONFIG} is not a rosafx run record.")
    return record


def write_run(path, record: dict) -> None:
    with atomic_file(Path(path) / CONFIG) as tmp:
        tmp.write_text(json.dumps({"format": RUN_FORMAT, "version": 1, **record}, indent=2, sort_keys=True))


def check_run_dir(path, inputs: list, *, resume: bool, overwrite: bool) -> Path:
    """Check RUN before anything is written: never an input, never a directory of someone
    else's files; an earlier run only with --resume (continue) or --overwrite (start again)."""
    path = Path(path).resolve()
    for item in inputs:
        item = Path(item).resolve()
        if path == item or path in item.parents or item in path.parents:
            raise RosafxError(f"-o {path} overlaps the input {item}: choose an output directory apart from the "
                              "model and the data.")
    if resume:
        read_run(path)
        return path
    if path.exists() and not path.is_dir():
        raise RosafxError(f"-o {path} is a file; RUN is a directory.")
    if path.is_dir() and any(path.iterdir()):
        if not is_run(path):
            raise RosafxError(f"-o {path} is a directory that rosafx did not write; choose a new or empty directory.")
        if not overwrite:
            raise RosafxError(f"{path} holds an earlier run: --resume continues it, --overwrite starts it again.")
    return path


def start_run_dir(path: Path, *, resume: bool) -> Path:
    """After ``check_run_dir`` and once the inputs have been read: clear an earlier run, create RUN."""
    if not resume and is_run(path):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
