"""rosafx train MODEL --method rosa --rank 8 --data train.tsv [--eval dev.tsv] ... -o RUN

Thin over ``rosafx.fit`` and the data readers: the configuration (flags over --config over
defaults) is written into RUN/run.json, and every rebuild of the model (resume, export,
evaluate) reads it from there.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rosafx.training import distributed
from rosafx.recipes import recipe
from rosafx.errors import RosafxError
from rosafx.io.outputs import resolve
from rosafx.training.run_dir import begin_run, check_run_dir, check_same_inputs, input_fingerprint, restart_run
from rosafx.training.runs import CACHE, Run, read_run, run_state

from rosafx.cli.errors import Interrupted
from rosafx.cli.options import (AlphaOpt, MethodOpt, OptionOpt, QuantizeGroupOpt, QuantizeOpt, RankOpt, RulesOpt,
                                TargetOpt, flag)

EXAMPLES = """
Examples:
  rosafx train ./MiniLM --method lora --rank 8 --data train.tsv --eval dev.tsv --epochs 3 -o run
  rosafx train ./gpt2 --method rosa --rank 8 -O resample_every=200 --task causal-lm --data text.txt --max-steps 1000 -o run
  rosafx train ./llama --method lora --task causal-lm --data gsm8k.jsonl --prompt-column question --response-column answer --max-length 512 -o run
  rosafx train ./qwen --method lora --task causal-lm --data chats.jsonl --messages-column messages --pack -o run
  rosafx train ... -o run --resume
  rosafx train ./MiniLM --method lora --data train.tsv --max-length 512 --grad-checkpoint -o run   (less memory)
  rosafx train ./MiniLM --method lora --quantize nf4 --data train.tsv -o run   (QLoRA: a 4-bit frozen base)
  rosafx train ./MiniLM --method lora --data train.tsv --batch-size 16 --nproc 2 -o run   (DDP, global batch 32)
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m rosafx train ... -o run
"""

Opt = typer.Option


def train(
    ctx: typer.Context,
    model: Annotated[Optional[Path], typer.Argument(help="HF model directory, or `rosafx adapt` output")] = None,
    out: Annotated[Path, Opt("--out", "-o", help="Run directory (RUN)")] = ...,
    method: MethodOpt = None, target: TargetOpt = None, rank: RankOpt = None, alpha: AlphaOpt = None,
    option: OptionOpt = None, rules: RulesOpt = None,
    quantize: QuantizeOpt = None, quantize_group_size: QuantizeGroupOpt = None,
    data: flag("data") = None,
    eval: flag("eval", "--eval") = None,
    task: flag("task") = None,
    text_column: flag("text_column") = None,
    pair_column: flag("pair_column") = None,
    label_column: flag("label_column") = None,
    prompt_column: flag("prompt_column") = None,
    response_column: flag("response_column") = None,
    messages_column: flag("messages_column") = None,
    pack: flag("pack", "--pack/--no-pack") = None,
    max_length: flag("max_length") = None,
    epochs: flag("epochs") = None,
    max_steps: flag("max_steps") = None,
    batch_size: flag("batch_size") = None,
    grad_accum: flag("grad_accum") = None,
    lr: flag("lr") = None,
    warmup_ratio: flag("warmup_ratio") = None,
    schedule: flag("schedule") = None,
    weight_decay: flag("weight_decay") = None,
    eval_every: flag("eval_every") = None,
    save_every: flag("save_every") = None,
    best_metric: flag("best_metric") = None,
    seed: flag("seed") = None,
    precision: flag("precision") = None,
    compile: flag("compile", "--compile/--no-compile") = None,
    grad_checkpoint: flag("grad_checkpoint", "--grad-checkpoint/--no-grad-checkpoint") = None,
    device: flag("device") = None,
    config: Annotated[Optional[Path], Opt(help="YAML or JSON file with these options (flags override it)")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue RUN from its last checkpoint")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace an earlier run in RUN")] = False,
    nproc: Annotated[Optional[int], Opt("--nproc", help="Run N data-parallel processes here (launches torchrun)")] = None,
) -> None:
    """Train adapters on MODEL with the data, into the run directory RUN."""
    flags = {k: v for k, v in locals().items() if k in recipe.DEFAULTS}
    if nproc is not None:
        launch_torchrun(nproc, (ctx.obj or {}).get("argv"))
    here = distributed.init_from_torchrun()
    # 1. everything is checked and built before RUN is touched: options, inputs, the adapted model
    record = None
    if resume:
        if here.is_main:
            check_run_dir(out, [], resume=True, overwrite=overwrite)
        record = read_run(out)
        settings = resumed_settings(out, record, flags, config)
        check_same_world(record, here)
    else:
        settings = recipe.resolve(flags, config)
    device = recipe.training_device(settings.get("device", "auto"), here)
    inputs = [p for p in (settings["model"], settings["data"], settings["eval"], settings["rules"]) if p]
    run_dir = check_run_dir(out, inputs, resume=resume, overwrite=overwrite) if here.is_main else resolve(out)
    replacing = run_state(run_dir) if here.is_main and not resume else None
    spec = recipe.model_spec(settings["model"])
    tokenizer = recipe.open_tokenizer(spec.source)
    train_examples = recipe.read_examples(settings["data"], settings)
    settings["task"] = train_examples.task
    label_names = train_examples.label_names
    eval_examples = recipe.read_examples(settings["eval"], settings, label_names) if settings["eval"] else None
    fingerprint = input_fingerprint({"data": settings["data"], "eval": settings["eval"]})
    if resume:
        check_same_inputs(out, record, fingerprint)
        check_same_labels(out, record, settings["task"], label_names)
    recipe.check_head(settings, spec, label_names)
    inputs_example = recipe.example_inputs(tokenizer, settings, pairs=train_examples.pairs is not None)
    adapted = recipe.on_device(recipe.build_adapted(settings, spec, label_names, inputs_example), device)
    echo = typer.echo if here.is_main else (lambda text: None)
    # 2. RUN: locked for this process; a fresh run is swapped in whole with its run.json
    new_record = None if resume else {
        "config": settings, "label_names": label_names, "task": settings["task"],
        "pairs": train_examples.pairs is not None, "columns": train_examples.columns,
        "distributed": batch_record(settings, here), "inputs": fingerprint}
    start = None
    try:
        with distributed.main_first():  # rank 0 sets RUN up and writes the token cache; the others then read them
            if here.is_main:
                start = begin_run(run_dir, new_record, inputs=inputs, resume=resume, overwrite=overwrite)
                if replacing == "unfinished":
                    echo(f"replacing the unfinished run in {run_dir} (it stopped before its run.json was written)")
            restart = resume and Run(run_dir).latest_checkpoint() is None
            if restart and here.is_main:
                echo(f"{run_dir} has no checkpoint yet: starting it again from step 0 with its recorded options")
                restart_run(run_dir)
            cache = run_dir / CACHE
            # every rank walks the global batches (per-process batch x world) and keeps its slice of rows
            train_batches = recipe.batches_of(train_examples, tokenizer,
                                              {**settings, "batch_size": settings["batch_size"] * here.size}, cache,
                                              train=True)
            eval_batches = (recipe.batches_of(eval_examples, tokenizer, settings, cache, train=False)
                            if eval_examples and here.is_main else None)
        echo(f"{len(train_examples)} training examples ({settings['task']}"
             + (f", labels {label_names}" if label_names else "") + ")"
             + (f", {len(eval_examples)} for evaluation" if eval_examples else "")
             + (f"; {here.size} processes, global batch {batch_record(settings, here)['global_batch']}"
                if here.size > 1 else ""))
        for note in {recipe.data_note(b, settings["max_length"]) for b in (train_batches, eval_batches)} - {None}:
            echo(note)
        loss, metrics = recipe.task_loss_and_metrics(settings["task"])
        best = settings["best_metric"] or (recipe.best_metric_of(settings["task"]) if eval_examples else None)
        history = distributed.fit_distributed(
            adapted, train_batches, loss, eval_batches=eval_batches, metrics=metrics,
            steps=settings["max_steps"], epochs=None if settings["max_steps"] else (settings["epochs"] or 1),
            lr=settings["lr"], weight_decay=settings["weight_decay"], schedule=settings["schedule"],
            warmup_ratio=settings["warmup_ratio"], grad_accum=settings["grad_accum"], precision=settings["precision"],
            eval_every=settings["eval_every"], save_every=settings["save_every"], run=run_dir,
            resume=resume and not restart, best_metric=best, calibration_batches=settings["calibration_batches"],
            seed=settings["seed"], compile=bool(settings.get("compile")), max_length=settings["max_length"],
            grad_checkpoint=settings.get("grad_checkpoint") or False)
    except BaseException as exc:
        # before the new run's first checkpoint nothing of it is worth more than the earlier run
        interrupted = isinstance(exc, KeyboardInterrupt)
        try:
            undone = start is not None and start.abandon(keep_new=interrupted)
        except Exception:  # the first error is the one to report; RUN is then the new run, resumable
            undone = False
        if interrupted:
            raise Interrupted(interrupted_message(out, run_dir, start is not None, undone)) from None
        raise
    finally:
        if start is not None:
            start.close()
    distributed.leave()
    if history.compile_seconds is not None:
        echo(f"torch.compile: first step {history.compile_seconds:.1f} s more than a later step; "
                   f"later steps median {history.step_seconds or 0.0:.3f} s")
    last = history.evals[-1] if history.evals else history.steps[-1]
    echo("final: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)))
    echo(f"wrote {run_dir} (adapter in {run_dir / 'adapter'}; `rosafx export {out} --merge -o OUT`)")


def resumed_settings(out: Path, record: dict, flags: dict, config_file: Optional[Path]) -> dict:
    """The recorded options; every option given again (flags, --config) must equal them,
    except where the run executes (``recipe.RESUMABLE_WITH_OTHER``)."""
    given = dict(recipe.read_config_file(config_file)) if config_file is not None else {}
    given.update({k: v for k, v in flags.items() if v is not None})
    asked = recipe.resolve(given, run_config=record["config"])  # run.json's values checked as run.json's
    differ = sorted(k for k in given if asked[k] != record["config"].get(k) and k not in recipe.RESUMABLE_WITH_OTHER)
    if differ:
        shown = ", ".join(f"{k}: {record['config'].get(k)!r} -> {asked[k]!r}" for k in differ)
        raise RosafxError(f"{out} was started with other options ({shown}); --resume continues it as it was. Drop "
                          "those options (flags or --config), or start a new run.")
    return {**record["config"], **{k: asked[k] for k in recipe.RESUMABLE_WITH_OTHER if k in given}}


def check_same_labels(out: Path, record: dict, task: str, label_names) -> None:
    if task != record["task"] or label_names != record["label_names"]:
        raise RosafxError(f"{out} was started on data with task {record['task']} and labels {record['label_names']}; "
                          f"the data now gives {task} and {label_names}. Resume on the data it started with, or "
                          "start a new run.")


def interrupted_message(out: Path, run_dir: Path, started: bool, undone: bool) -> str:
    if not started:
        return f"interrupted before {out} was written; nothing was changed there."
    if undone:
        return f"interrupted before the new run's first checkpoint; {out} holds the earlier run again, unchanged."
    last = Run(run_dir).latest_checkpoint()
    kept = f"its last checkpoint ({last.name}) is whole" if last else "it has no checkpoint yet (it starts from step 0)"
    return f"interrupted: `rosafx train -o {out} --resume` continues {out}; {kept}."


def batch_record(settings: dict, here: distributed.World) -> dict:
    """The global batch = per-process batch x processes x gradient accumulation."""
    return {"world_size": here.size, "batch_size_per_process": settings["batch_size"],
            "grad_accum": settings["grad_accum"],
            "global_batch": settings["batch_size"] * here.size * settings["grad_accum"]}


def check_same_world(record: dict, here: distributed.World) -> None:
    started = record.get("distributed", {}).get("world_size", 1)
    if started != here.size:
        raise RosafxError(f"The run was started with {started} process(es) and resumes with {here.size}: the global "
                          f"batch and the data position would change. Resume with --nproc {started}.")


def launch_torchrun(nproc: int, argv: list[str] | None) -> None:
    """Start this same command under torchrun with ``nproc`` processes on this machine, and
    exit with its status."""
    if distributed.launched_by_torchrun():
        raise RosafxError("--nproc starts torchrun; under torchrun already, leave --nproc out.")
    if nproc < 1:
        raise RosafxError(f"--nproc must be at least 1, got {nproc}.")
    if argv is None:
        raise RosafxError("--nproc needs the command line; run `torchrun --nproc_per_node N -m rosafx train ...`.")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "rosafx", *without_nproc(argv)]
    raise SystemExit(subprocess.run(command).returncode)


def without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept
