"""Fault matrix, outputs: no command destroys the input or data rosafx did not write, and
after kill -9 at any moment the next run finds the old or the new output whole and
removes its own leftovers."""
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import rosafx
from faults_common import assert_user_error, cli, copy_tree, leftovers, snapshot
from rosafx.io.atomic import OLD_TAG, atomic_directory, clean_leftovers, recover, temp_file_beside
from rosafx.errors import RosafxError

ADAPT = ("--method", "lora", "--target", "proj", "--rank", "2")


def test_output_is_the_input_model_directory(fault_models, tmp_path, capsys):
    model = copy_tree(fault_models["hf"], tmp_path / "bert")
    before = snapshot(model)
    for extra in ((), ("--overwrite",)):
        assert_user_error(cli(capsys, "adapt", model, "--method", "lora", "-o", model, *extra), str(model), "input")
    assert snapshot(model) == before


def test_output_contains_the_input(fault_models, tmp_path, capsys):
    model = copy_tree(fault_models["pt2"], tmp_path / "f.pt2")
    before = snapshot(tmp_path)
    assert_user_error(cli(capsys, "adapt", model, *ADAPT, "-o", tmp_path, "--overwrite"), "input")
    assert snapshot(tmp_path) == before


def test_output_with_foreign_files_needs_overwrite(fault_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert_user_error(cli(capsys, "adapt", fault_models["pt2"], *ADAPT, "-o", out), str(out), "--overwrite")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert cli(capsys, "adapt", fault_models["pt2"], *ADAPT, "-o", out, "--overwrite").code == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "rosafx.json", "source.json"]
    assert leftovers(tmp_path) == []


def test_earlier_output_is_replaced_whole(fault_models, tmp_path, capsys):
    out = copy_tree(fault_models["adapter"], tmp_path / "out")
    assert cli(capsys, "adapt", fault_models["pt2"], "--method", "lora", "--target", "proj", "--rank", "3",
               "-o", out).code == 0
    assert json.loads((out / "rosafx.json").read_text())["sites"]["proj"]["config"]["rank"] == 3
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("row", ["file", "parent is a file", "symlink"])
def test_output_path_that_cannot_be_a_directory(row, fault_models, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    target = tmp_path / "real"
    target.mkdir()
    (target / "data.bin").write_bytes(b"keep")
    out = {"file": tmp_path / "notes.txt", "parent is a file": tmp_path / "notes.txt" / "out",
           "symlink": tmp_path / "link"}[row]
    if row == "symlink":
        out.symlink_to(target, target_is_directory=True)
    before = snapshot(tmp_path)
    assert_user_error(cli(capsys, "adapt", fault_models["pt2"], *ADAPT, "-o", out), "notes.txt" if row != "symlink"
                      else "symbolic link")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("row", ["directory", "base model", "adapter directory"])
def test_export_never_overwrites_inputs_or_directories(row, fault_models, tmp_path, capsys):
    adapter = copy_tree(fault_models["adapter"], tmp_path / "adapter")
    out = {"directory": tmp_path / "somedir", "base model": fault_models["pt2"], "adapter directory": adapter}[row]
    (tmp_path / "somedir").mkdir()
    before = snapshot(out)
    assert_user_error(cli(capsys, "export", adapter, "-o", out), out.name)
    assert snapshot(out) == before


def test_export_to_a_file_inside_an_input_is_refused_even_with_overwrite(fault_models, tmp_path, capsys):
    """issue 23: `export ADAPTER -o FILE` wrote over the adapter's own tensors and over the
    base model's model.safetensors (a path inside an input)."""
    bert = copy_tree(fault_models["hf"], tmp_path / "bert")
    assert cli(capsys, "adapt", bert, "--method", "lora", "--target", "query", "--rank", "2",
               "-o", tmp_path / "adapter").code == 0
    adapter = tmp_path / "adapter"
    for out, overwrite in itertools.product((adapter / "adapter.safetensors", bert / "model.safetensors",
                                             bert / "new.onnx"), ((), ("--overwrite",))):
        before = snapshot(tmp_path)
        assert_user_error(cli(capsys, "export", adapter, "-o", out, *overwrite), str(out.parent.name), "input")
        assert snapshot(tmp_path) == before


def test_export_replaces_an_existing_file_only_with_overwrite(fault_models, tmp_path, capsys, monkeypatch):
    """issue 23: a user's data file given as `-o` was silently replaced by the ONNX."""
    monkeypatch.setattr(rosafx, "export_onnx", lambda model, path, **kw: Path(path).write_bytes(b"onnx"))  # fast
    out = tmp_path / "results.csv"
    out.write_text("years,of,work\n")
    assert_user_error(cli(capsys, "export", fault_models["adapter"], "-o", out), str(out), "--overwrite")
    assert out.read_text() == "years,of,work\n"
    assert cli(capsys, "export", fault_models["adapter"], "-o", out, "--overwrite").code == 0
    assert out.read_bytes() == b"onnx"


def test_a_directory_output_inside_an_input_is_refused(fault_models, tmp_path, capsys):
    bert = copy_tree(fault_models["hf"], tmp_path / "bert")
    before = snapshot(bert)
    for extra in ((), ("--overwrite",)):
        assert_user_error(cli(capsys, "adapt", bert, "--method", "lora", "--target", "query", "-o", bert / "lora",
                              *extra), "inside the input")
    assert snapshot(bert) == before


def test_api_save_refuses_foreign_directory(fault_models, tmp_path):
    import torch
    from models import functional_linear
    model, example = functional_linear()
    adapted = rosafx.transform(model, {"proj": {"method": "lora", "rank": 2}}, example_inputs=example)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(RosafxError, match="did not write"):
        rosafx.save(adapted, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "x"
    rosafx.save(adapted, tmp_path / "a")
    rosafx.save(adapted, tmp_path / "a")  # an earlier output: replaced
    assert leftovers(tmp_path) == [] and torch.is_tensor(next(iter(rosafx.load(model, tmp_path / "a",
                                                                                 example_inputs=example).parameters())))


def test_atomic_directory_replaces_a_file_and_symlink_leftovers_are_not_fatal(tmp_path):
    """rmtree(ignore_errors=True) did nothing on files: every later save failed."""
    out = tmp_path / "out"
    out.write_text("old file")
    for round_ in range(2):
        with atomic_directory(out) as tmp:
            (tmp / "rosafx.json").write_text(str(round_))
        assert (out / "rosafx.json").read_text() == str(round_)
    assert leftovers(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_dead_processes_are_cleaned_live_ones_kept(tmp_path):
    out = tmp_path / "model.onnx"
    dead = tmp_path / f".model.onnx.rosafx-tmp-{_dead_pid()}-abc.onnx"
    dead.write_bytes(b"partial")
    dead_dir = tmp_path / f".model.onnx.rosafx-tmp-{_dead_pid()}-dir"
    dead_dir.mkdir()
    (dead_dir / "x").write_text("y")
    dead_link = tmp_path / f".model.onnx.rosafx-tmp-{_dead_pid()}-lnk"
    dead_link.symlink_to(tmp_path / "elsewhere")
    live = tmp_path / f".model.onnx.rosafx-tmp-{os.getppid()}-xyz.onnx"   # a concurrent export
    live.write_bytes(b"in progress")
    other = tmp_path / ".other.onnx.rosafx-tmp-1-abc.onnx"                 # not this target's
    other.write_bytes(b"?")
    tmp = temp_file_beside(out)
    assert not dead.exists() and not dead_dir.exists() and not dead_link.is_symlink()
    assert live.exists() and other.exists() and tmp.exists()


def test_recover_puts_the_parked_directory_back(tmp_path):
    out = tmp_path / "out"
    parked = tmp_path / f".out.{OLD_TAG}-{_dead_pid()}"
    parked.mkdir()
    (parked / "rosafx.json").write_text("old")
    recover(out)
    assert (out / "rosafx.json").read_text() == "old" and not parked.exists()
    parked.mkdir()
    recover(out)  # both present: the crash came after the second rename
    assert not parked.exists() and (out / "rosafx.json").read_text() == "old"
    assert clean_leftovers(out) == []


# ---------------------------------------------------------------- kill -9 at several moments (subprocesses)
ATOMIC_KILLER = r"""
import os, signal, sys, types
package = types.ModuleType("rosafx_light")      # rosafx/io/atomic.py (+ errors.py) alone: no torch import, fast
package.__path__ = [sys.argv[1]]
sys.modules["rosafx_light"] = package
import rosafx_light.io.atomic as atomic

moment, out = sys.argv[2], sys.argv[3]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_exchange = os.replace, atomic.exchange
if moment == "after exchange":
    atomic.exchange = lambda a, b: real_exchange(a, b) and die()
if moment == "between renames":
    atomic.exchange = lambda a, b: False
    def replace(src, dst):
        real_replace(src, dst)
        if atomic.OLD_TAG in str(dst):
            die()
    os.replace = replace
if moment == "pruning":
    atomic.remove_path = lambda path: die()
    atomic.remove_atomically(out)
if moment == "file before rename":
    with atomic.atomic_file(out) as tmp:
        tmp.write_text("new")
        die()
with atomic.atomic_directory(out) as tmp:
    (tmp / "rosafx.json").write_text("new")
    (tmp / "adapter.safetensors").write_text("new")
    if moment == "writing":
        die()
"""

CLI_KILLER = r"""
import os, signal, sys
import rosafx.cli.adapt as adapt_cli
from rosafx.cli.main import main

moment, argv = sys.argv[1], sys.argv[2:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_write = os.replace, adapt_cli.write_adapter
if moment == "adapt writing":
    def write(adapted, tmp):
        real_write(adapted, tmp)
        die()
    adapt_cli.write_adapter = write
if moment == "onnx written":
    def replace(src, dst):
        if ".rosafx-tmp-" in str(src) and str(dst).endswith(".onnx"):
            die()
        real_replace(src, dst)
    os.replace = replace
main(argv)
"""
ROSAFX_DIR = Path(rosafx.__file__).parent


def _assert_killed(process):
    _, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, err[-2000:]


@pytest.mark.parametrize("moment,expect", [("writing", "old"), ("after exchange", "new"),
                                           ("between renames", "old"), ("file before rename", "old")])
def test_kill_during_atomic_write_leaves_old_or_new_whole(moment, expect, tmp_path):
    out = tmp_path / "out"
    if moment == "file before rename":
        out.write_text("old")
    else:
        out.mkdir()
        for name in ("rosafx.json", "adapter.safetensors"):
            (out / name).write_text("old")
    _assert_killed(subprocess.Popen([sys.executable, "-c", ATOMIC_KILLER, ROSAFX_DIR, moment, out],
                                    stderr=subprocess.PIPE, text=True))
    recover(out)  # what every reader does first
    if out.is_file():
        assert out.read_text() == expect
    else:
        assert {p.name: p.read_text() for p in out.iterdir()} == {"rosafx.json": expect, "adapter.safetensors": expect}
    with atomic_directory(tmp_path / "other"):  # a later write elsewhere leaves this target's leftovers alone
        pass
    clean_leftovers(out)  # the next write to out does this first
    assert leftovers(tmp_path) == []


CONCURRENT_WRITER = r"""
import sys, types
package = types.ModuleType("rosafx_light")
package.__path__ = [sys.argv[1]]
sys.modules["rosafx_light"] = package
import rosafx_light.io.atomic as atomic
out, tag = sys.argv[2], sys.argv[3]
for i in range(40):
    if out.endswith(".onnx"):
        tmp = atomic.temp_file_beside(out)   # what export_onnx does
        tmp.write_text(tag * 1000)
        atomic.os.replace(tmp, out)
    else:
        with atomic.atomic_directory(out) as tmp:
            (tmp / "rosafx.json").write_text(tag * 1000)
"""


@pytest.mark.parametrize("target", ["model.onnx", "adapter"])
def test_concurrent_writers_leave_one_whole_version(target, tmp_path):
    """Two processes writing one output at once (two exports to one file, two saves to one
    directory): each sees the other's temporaries alive and leaves them; the result is one
    whole version and no leftovers."""
    out = tmp_path / target
    writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, ROSAFX_DIR, out, tag],
                                stderr=subprocess.PIPE, text=True) for tag in "ab"]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err[-2000:]
    text = out.read_text() if out.is_file() else (out / "rosafx.json").read_text()
    assert text in ("a" * 1000, "b" * 1000)
    assert leftovers(tmp_path) == []


def test_kill_while_pruning_a_checkpoint_leaves_it_whole_or_gone(tmp_path):
    """Old training checkpoints are deleted with one rename first: a kill mid-delete leaves a
    hidden leftover (cleaned later), never a half checkpoint under its own name."""
    from rosafx.io.atomic import clean_leftovers_in
    old = tmp_path / "step-00000010"
    old.mkdir()
    (old / "state.pt").write_text("x")
    _assert_killed(subprocess.Popen([sys.executable, "-c", ATOMIC_KILLER, ROSAFX_DIR, "pruning", old],
                                    stderr=subprocess.PIPE, text=True))
    assert not old.exists() and len(leftovers(tmp_path)) == 1
    clean_leftovers_in(tmp_path)
    assert leftovers(tmp_path) == []


def test_kill_during_adapt_and_export(fault_models, tmp_path, capsys):
    """End to end through the CLI, both killed runs side by side (one interpreter start each)."""
    out = copy_tree(fault_models["adapter"], tmp_path / "out")
    old_adapter = snapshot(out)
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    previous = onnx_dir / "model.onnx"
    previous.write_bytes(b"previous export")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    runs = [subprocess.Popen([sys.executable, "-c", CLI_KILLER, *map(str, argv)], stderr=subprocess.PIPE, text=True,
                             env=env)
            for argv in (["adapt writing", "adapt", fault_models["pt2"], *ADAPT[:-1], "3", "-o", out],
                         ["onnx written", "export", fault_models["adapter"], "-o", previous, "--overwrite"])]
    for run in runs:
        _assert_killed(run)
    assert snapshot(out) == old_adapter
    assert previous.read_bytes() == b"previous export"
    assert [p.name for p in onnx_dir.iterdir() if not p.name.startswith(".")] == ["model.onnx"]
    assert leftovers(onnx_dir)  # the killed export's hidden temporary ...
    assert cli(capsys, "adapt", fault_models["pt2"], *ADAPT, "-o", out).code == 0      # the next run cleans up
    temp_file_beside(previous).unlink()  # ... goes when the next export to model.onnx starts (it begins so)
    assert leftovers(tmp_path) == [] and leftovers(onnx_dir) == [] and previous.read_bytes() == b"previous export"


def test_a_directory_another_writer_creates_while_we_rename_is_replaced(tmp_path, monkeypatch):
    """The race behind a once-flaky concurrent-writers row: ``directory`` did not exist when
    looked at, another writer created it before our rename (ENOTEMPTY). Look again, swap."""
    from rosafx.io.atomic import atomic_directory
    target = tmp_path / "adapter"
    real_exists, looked = Path.exists, []

    def exists_misses_the_other_writer_once(self):
        if self == target and not looked:
            looked.append(self)
            return False
        return real_exists(self)

    with atomic_directory(target) as tmp:
        (tmp / "rosafx.json").write_text("ours")
        target.mkdir()
        (target / "rosafx.json").write_text("theirs")
        monkeypatch.setattr(Path, "exists", exists_misses_the_other_writer_once)
    monkeypatch.undo()
    assert (target / "rosafx.json").read_text() == "ours" and looked
    assert leftovers(tmp_path) == []
