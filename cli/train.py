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
from rosafx.training.runs import check_run_dir, read_run, start_run_dir, write_run

from rosafx.cli.options import AlphaOpt, MethodOpt, OptionOpt, RankOpt, RulesOpt, TargetOpt

EXAMPLES = """
Examples:
  rosafx train ./MiniLM --method lora --rank 8 --data train.tsv --eval dev.tsv --epochs 3 -o run
  rosafx train ./gpt2 --method rosa --rank 8 -O resample_every=200 --task causal-lm --data text.txt --max-steps 1000 -o run
  rosafx train ... -o run --resume
  rosafx train ./MiniLM --method lora --data train.tsv --max-length 512 --grad-checkpoint -o run   (less memory)
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
    data: Annotated[Optional[Path], Opt(help="Training data: .tsv (GLUE layouts), .csv, .jsonl, .txt")] = None,
    eval: Annotated[Optional[Path], Opt("--eval", help="Evaluation data, same layout")] = None,
    task: Annotated[Optional[str], Opt(help="classification | regression | causal-lm (default: from the layout)")] = None,
    text_column: Annotated[Optional[str], Opt(help="Column with the text")] = None,
    pair_column: Annotated[Optional[str], Opt(help="Column with the second text of a pair")] = None,
    label_column: Annotated[Optional[str], Opt(help="Column with the label or score")] = None,
    max_length: Annotated[Optional[int], Opt(help="Tokens per example (default 128)")] = None,
    epochs: Annotated[Optional[float], Opt(help="Passes over the data")] = None,
    max_steps: Annotated[Optional[int], Opt(help="Optimizer steps (instead of --epochs)")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Examples per batch and process (default 32)")] = None,
    grad_accum: Annotated[Optional[int], Opt(help="Batches per optimizer step (default 1)")] = None,
    lr: Annotated[Optional[float], Opt(help="Peak learning rate (default 5e-4)")] = None,
    warmup_ratio: Annotated[Optional[float], Opt(help="Fraction of steps of linear warm-up")] = None,
    schedule: Annotated[Optional[str], Opt(help="linear | cosine | constant")] = None,
    weight_decay: Annotated[Optional[float], Opt(help="AdamW weight decay")] = None,
    eval_every: Annotated[Optional[int], Opt(help="Evaluate every N steps (and at the end)")] = None,
    save_every: Annotated[Optional[int], Opt(help="Checkpoint every N steps (and at the end)")] = None,
    best_metric: Annotated[Optional[str], Opt(help="Keep RUN/best by this metric (default: the task's)")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed for the head, adapters, shuffling, dropout")] = None,
    precision: Annotated[Optional[str], Opt(help="fp32 | bf16 (autocast)")] = None,
    compile: Annotated[Optional[bool], Opt("--compile/--no-compile",
                                           help="Train through a compiled step without host syncs: batches "
                                                "padded to power-of-two lengths, CUDA graphs on a GPU (compile "
                                                "time reported apart; on a CPU leave it off)")] = None,
    grad_checkpoint: Annotated[Optional[bool], Opt("--grad-checkpoint/--no-grad-checkpoint",
                                                   help="Recompute each layer's activations in the backward "
                                                        "(less memory, more time; a --config file may name "
                                                        "the mode: full, attention)")] = None,
    device: Annotated[Optional[str], Opt(help="auto | cpu | cuda | cuda:N (default auto: a GPU when there "
                                              "is one, its adapter ops on the Triton kernels)")] = None,
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
    if resume:
        record = read_run(out)
        asked = recipe.resolve({**record["config"], **{k: v for k, v in flags.items() if v is not None}})
        given = [k for k, v in flags.items() if v is not None and asked[k] != record["config"].get(k)
                 and k not in recipe.RESUMABLE_WITH_OTHER]
        if given:
            raise RosafxError(f"{out} was started with other options ({given}); --resume continues it as it "
                              "was. Drop those flags, or start a new run.")
        settings = {**record["config"], **{k: flags[k] for k in recipe.RESUMABLE_WITH_OTHER if flags.get(k)}}
        check_same_world(record, here)
    else:
        settings = recipe.resolve(flags, config)
    device = recipe.training_device(settings.get("device", "auto"), here)    # checked before RUN is touched
    inputs = [p for p in (settings["model"], settings["data"], settings["eval"]) if p]
    with distributed.main_first():  # rank 0 checks and creates RUN and the token cache; the others then read them
        run_dir = check_run_dir(out, inputs, resume=resume, overwrite=overwrite) if here.is_main else out.resolve()
        spec = recipe.model_spec(settings["model"])
        tokenizer = recipe.open_tokenizer(spec.source)
        train_examples = recipe.read_examples(settings["data"], settings)
        settings["task"] = train_examples.task
        label_names = train_examples.label_names
        eval_examples = recipe.read_examples(settings["eval"], settings, label_names) if settings["eval"] else None
        recipe.check_head(settings, spec, label_names)
        if here.is_main:
            start_run_dir(run_dir, resume=resume)
        cache = run_dir / "cache"
        # every rank walks the global batches (per-process batch x world) and keeps its slice of rows
        train_batches = recipe.batches_of(train_examples, tokenizer,
                                          {**settings, "batch_size": settings["batch_size"] * here.size}, cache,
                                          train=True)
        eval_batches = (recipe.batches_of(eval_examples, tokenizer, settings, cache, train=False)
                        if eval_examples and here.is_main else None)
    inputs = recipe.example_inputs(tokenizer, settings, pairs=train_examples.pairs is not None)
    adapted = recipe.on_device(recipe.build_adapted(settings, spec, label_names, inputs), device)
    if not resume and here.is_main:
        write_run(run_dir, {"config": settings, "label_names": label_names, "task": settings["task"],
                            "pairs": train_examples.pairs is not None, "distributed": batch_record(settings, here)})
    echo = typer.echo if here.is_main else (lambda text: None)
    echo(f"{len(train_examples)} training examples ({settings['task']}"
         + (f", labels {label_names}" if label_names else "") + ")"
         + (f", {len(eval_examples)} for evaluation" if eval_examples else "")
         + (f"; {here.size} processes, global batch {batch_record(settings, here)['global_batch']}"
            if here.size > 1 else ""))
    loss, metrics = recipe.task_loss_and_metrics(settings["task"])
    best = settings["best_metric"] or (recipe.best_metric_of(settings["task"]) if eval_examples else None)
    history = distributed.fit_distributed(
        adapted, train_batches, loss, eval_batches=eval_batches, metrics=metrics,
        steps=settings["max_steps"], epochs=None if settings["max_steps"] else (settings["epochs"] or 1),
        lr=settings["lr"], weight_decay=settings["weight_decay"], schedule=settings["schedule"],
        warmup_ratio=settings["warmup_ratio"], grad_accum=settings["grad_accum"], precision=settings["precision"],
        eval_every=settings["eval_every"], save_every=settings["save_every"], run=run_dir, resume=resume,
        best_metric=best, calibration_batches=settings["calibration_batches"], seed=settings["seed"],
        compile=bool(settings.get("compile")), max_length=settings["max_length"],
        grad_checkpoint=settings.get("grad_checkpoint") or False)
    distributed.leave()
    if history.compile_seconds is not None:
        echo(f"torch.compile: first step {history.compile_seconds:.1f} s more than a later step; "
                   f"later steps median {history.step_seconds or 0.0:.3f} s")
    last = history.evals[-1] if history.evals else history.steps[-1]
    echo("final: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)))
    echo(f"wrote {run_dir} (adapter in {run_dir / 'adapter'}; `rosafx export {out} --merge -o OUT`)")


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
