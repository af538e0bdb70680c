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
temporaries. A RUN appears with its run.json (``begin_run`` swaps it in whole, once every
option, input and the adapted model have been checked); run.json also records a
fingerprint of the data files, which ``--resume`` compares.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from rosafx.errors import RosafxError
from rosafx.io.atomic import (OLD_TAG, atomic_directory, atomic_file, exchange, make_public, naming, prepare_parent,
                              remove_atomically, remove_path, temp_name)
from rosafx.io.outputs import check_apart
from rosafx.training.run_lock import LOCK, RunLock

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
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RosafxError(f"Cannot read {file}: {exc}. The run record is damaged; start the run again with "
                          "--overwrite.") from exc
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
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


# the run directory's life: checked before anything is written, locked, swapped in when ready

def check_run_dir(path, inputs: list, *, resume: bool, overwrite: bool) -> Path:
    """Check RUN before anything is written (returns it resolved): never an input or inside
    one, never a directory of someone else's files; an earlier run only with --resume
    (continue) or --overwrite (start again); an unfinished run (no run.json) is replaced by a
    plain re-run; a RUN another process is writing is refused."""
    path = check_apart(path, inputs)
    _check_state(path, resume=resume, overwrite=overwrite)
    if path.is_dir():
        RunLock.check_free(path)
    return path


def _check_state(path: Path, *, resume: bool, overwrite: bool) -> str:
    state = run_state(path)
    if resume:
        if state != "run":
            read_run(path)  # its message says what to do
        return state
    if state == "file":
        raise RosafxError(f"-o {path} is a file; RUN is a directory.")
    if state == "foreign":
        raise RosafxError(f"-o {path} is a directory that rosafx did not write; choose a new or empty directory.")
    if state == "run" and not overwrite:
        raise RosafxError(f"{path} holds an earlier run: --resume continues it (from its last checkpoint, or from "
                          "the start if it has none), --overwrite replaces it.")
    return state


class RunStart:
    """RUN set up for this process: its lock held, and the earlier run it replaced kept aside
    (hidden beside RUN) until the new run is worth more: ``close`` drops it; ``abandon``
    (a failure before the new run's first checkpoint) puts it back."""

    def __init__(self, path: Path, lock: RunLock, old: Path | None = None, old_lock: RunLock | None = None,
                 resumed: bool = False):
        self.path, self.lock, self.old, self.old_lock, self.resumed = path, lock, old, old_lock, resumed

    def abandon(self, keep_new: bool) -> bool:
        """Undo this start if the new run has no checkpoint: the earlier run goes back into
        RUN (True); without one, RUN goes unless ``keep_new``. False: nothing undone."""
        if self.resumed or Run(self.path).checkpoints():
            return False
        if self.old is None:
            if not keep_new:
                remove_atomically(self.path)
            return not keep_new
        with naming(self.path):
            if (self.path / CACHE).is_dir() and not (self.old / CACHE).exists():
                os.rename(self.path / CACHE, self.old / CACHE)
            if not exchange(self.old, self.path):
                aside = self.path.with_name(f"{temp_name(self.path)}new")
                os.replace(self.path, aside)
                os.replace(self.old, self.path)
                self.old = aside  # ``close`` removes the new run from there
        if run_state(self.path) == "empty":
            (self.path / LOCK).unlink(missing_ok=True)  # the user's empty folder as it was
        return True

    def close(self) -> None:
        """Drop what is kept aside (the earlier run, or the new one after ``abandon``) and
        release the locks."""
        if self.old is not None and (self.old.exists() or self.old.is_symlink()):
            remove_path(self.old)
        for lock in (self.old_lock, self.lock):
            if lock is not None:
                lock.release()


def _swap(new: Path, target: Path) -> Path:
    """Put ``new`` in ``target``'s place; returns where the replaced ``target`` now is."""
    if exchange(new, target):
        return new
    parked = target.with_name(f".{target.name}.{OLD_TAG}-{os.getpid()}")  # ``recover`` undoes a crash here
    os.replace(target, parked)
    os.replace(new, target)
    return parked


def begin_run(path, record: dict | None, *, inputs: list, resume: bool, overwrite: bool) -> RunStart:
    """Lock RUN for this process. A fresh run (``record``, its run.json) is built under a
    temporary name beside RUN and swapped in whole, once everything has been checked, so a
    RUN never exists without its run.json; an earlier run is kept aside until the new one
    ends or checkpoints (``RunStart``). The earlier run's token cache is carried over (it is
    keyed by its contents)."""
    path = Path(path)
    if resume:
        lock = RunLock.take(path)
        try:
            _check_state(path, resume=True, overwrite=overwrite)  # again, now that no one else writes it
        except BaseException:
            lock.release()
            raise
        return RunStart(path, lock, resumed=True)
    with naming(path):
        prepare_parent(path)  # restores a swap a crash interrupted, removes dead processes' temporaries
        staged = Path(tempfile.mkdtemp(prefix=temp_name(path), dir=path.parent))
        lock, old_lock = RunLock.take(staged), None
        try:
            make_public(staged)
            write_run(staged, record)
            if path.exists() or path.is_symlink():
                old_lock = RunLock.take(path)  # a second writer stops here
                _check_state(path, resume=False, overwrite=overwrite)
                if (path / CACHE).is_dir():
                    os.rename(path / CACHE, staged / CACHE)
                return RunStart(path, lock.moved_to(path), _swap(staged, path), old_lock)
            try:
                os.rename(staged, path)  # never over a directory another writer just filled
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise RosafxError(f"{path} was created by another process while this run was being set up; "
                                  "choose another -o.") from exc
            return RunStart(path, lock.moved_to(path))
        except BaseException:
            for held in (lock, old_lock):
                if held is not None:
                    held.release()
            if staged.exists():
                remove_path(staged)  # this run's staging
            raise


def restart_run(path) -> None:
    """--resume of a run that has no checkpoint yet: it starts again from step 0 with its
    recorded options; what it logged before the first checkpoint goes."""
    run = Run(path)
    run.truncate_metrics(0)
    for name in (BEST, ADAPTER, PLOT):
        remove_atomically(run.path / name)


# what the run read: resume checks it is still the same

def input_fingerprint(paths: dict) -> dict:
    """{name: {"bytes", "sha256"}} of each regular input file (``None`` paths left out)."""
    found = {}
    for name, file in paths.items():
        if file is None or not Path(file).is_file():
            continue
        digest, size = hashlib.sha256(), 0
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        found[name] = {"bytes": size, "sha256": digest.hexdigest()}
    return found


def check_same_inputs(path, record: dict, current: dict) -> None:
    """Refuse to resume on data other than the run started with (runs recorded before the
    fingerprint existed are not checked)."""
    started = record.get("inputs")
    if not started:
        return
    changed = [name for name in sorted(set(started) | set(current)) if started.get(name) != current.get(name)]
    if changed:
        files = ", ".join(f"--{name} {record['config'].get(name)}" for name in changed)
        raise RosafxError(f"{path} was started on other data: {files} changed since (size or sha256 differ). "
                          "--resume continues a run on the data it started with: restore it, or start a new run "
                          "(--overwrite).")
