"""A RUN directory: what ``rosafx.fit`` leaves behind and resumes from.

    RUN/run.json            the resolved configuration (the CLI writes it; a run repeats from it)
    RUN/source.json         the base model (as in `rosafx adapt` output)
    RUN/adapter/            the trained adapter: rosafx.json + adapter.safetensors (rosafx.load reads it)
    RUN/best/               the adapter at the best evaluation, when a metric is chosen
    RUN/metrics.jsonl       one line per step (step, epoch, loss, lr, time) and per evaluation
    RUN/plot.png            loss and evaluation metrics against the step (needs matplotlib)
    RUN/checkpoints/step-N/ adapter + state.pt (optimizer, schedule, RNG, data position, method state)
    RUN/cache/              the tokenized data (keyed by its contents)
    RUN/.lock               flock'ed by the one process writing RUN (``run_lock``)

Every directory is written under a temporary name and renamed when complete, so a kill -9
at any moment leaves the last complete checkpoint usable; ``latest_checkpoint`` ignores the
temporaries. How a RUN is checked, locked, swapped in and resumed: ``run_dir``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from rosafx.errors import RosafxError
from rosafx.io.atomic import atomic_directory, atomic_file, naming, remove_atomically
from rosafx.io.reading import read_json
from rosafx.training.run_lock import LOCK

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
        with naming(self.path / METRICS), (self.path / METRICS).open("a") as handle:
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
            with open(tmp / STATE, "wb") as handle:  # a file object: a full disk raises OSError(ENOSPC), not
                torch.save(state, handle)            # the RuntimeError torch's own file writer gives
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
CACHE = "cache"
_CACHE_FILE = re.compile(r"\.?tokens-[0-9a-f]+\.pt.*")  # the token cache (and its temporaries) an unfinished run left


def is_run(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def is_unfinished_run(path) -> bool:
    """A RUN an older rosafx created and then stopped in before writing run.json (killed or
    failed while tokenizing or building the model): nothing in it but the token cache."""
    path = Path(path)
    if not path.is_dir() or is_run(path):
        return False
    names = {p.name for p in path.iterdir()} - {LOCK}
    cache = path / CACHE
    return names == {CACHE} and cache.is_dir() and all(_CACHE_FILE.fullmatch(p.name) for p in cache.iterdir())


def run_state(path) -> str:
    """missing | file | empty | run | unfinished | foreign (a directory of someone else's files)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return "missing"
    if not path.is_dir():
        return "file"
    if is_run(path):
        return "run"
    if not {p.name for p in path.iterdir()} - {LOCK}:
        return "empty"
    return "unfinished" if is_unfinished_run(path) else "foreign"


def read_run(path) -> dict:
    """RUN/run.json, checked: a damaged or foreign record is a one-line error, not a crash later."""
    path = Path(path)
    if not is_run(path):
        if is_unfinished_run(path):
            raise RosafxError(f"{path} is an unfinished run: it stopped before its {CONFIG} was written, so nothing "
                              "was trained. Run the same `rosafx train` command without --resume to start it again.")
        raise RosafxError(f"{path} is not a rosafx run directory (no {CONFIG}); `rosafx train ... -o RUN` makes one.")
    file = path / CONFIG
    record = read_json(file, "the run record")  # a damaged file: one line naming it
    if record.get("format") != RUN_FORMAT:
        raise RosafxError(f"{file} is not a rosafx run record.")
    problem = _record_problem(record)
    if problem:
        raise RosafxError(f"{file} is damaged ({problem}); start the run again with --overwrite.")
    return record


def _record_problem(record: dict) -> str | None:
    config = record.get("config")
    if not isinstance(config, dict):
        return "'config' is not a mapping"
    for key in ("model", "data"):
        if not isinstance(config.get(key), str):
            return f"config.{key} is not a path"
    if not isinstance(record.get("task"), str):
        return "'task' is not a string"
    names = record.get("label_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return "'label_names' is not a list of strings"
    if not isinstance(record.get("pairs"), bool):
        return "'pairs' is not true or false"
    if not isinstance(record.get("distributed", {}), dict) or not isinstance(record.get("inputs", {}), dict):
        return "'distributed' or 'inputs' is not a mapping"
    return None


def write_run(path, record: dict) -> None:
    with atomic_file(Path(path) / CONFIG) as tmp:
        tmp.write_text(json.dumps({"format": RUN_FORMAT, "version": 1, **record}, indent=2, sort_keys=True))
