"""The life of a RUN directory under `rosafx train`: checked before anything is written,
locked for one writer (``run_lock``), swapped in whole with its run.json once every option,
input and the adapted model have been checked, the earlier run kept aside until the new one
is worth more; and what --resume checks (the data's fingerprint)."""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from rosafx.errors import RosafxError
from rosafx.io.atomic import (OLD_TAG, exchange, make_public, naming, prepare_parent, remove_atomically, remove_path,
                              temp_name)
from rosafx.io.outputs import check_apart
from rosafx.training.run_lock import LOCK, RunLock
from rosafx.training.runs import ADAPTER, BEST, CACHE, PLOT, Run, read_run, run_state, write_run

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
