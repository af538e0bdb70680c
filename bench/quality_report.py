"""docs/quality.md's tables and plots, rebuilt from the cell JSONs of bench/quality.py alone.

The generated parts of docs/quality.md sit between `<!-- quality:NAME -->` and
`<!-- /quality:NAME -->` markers; everything else in the file (the prose, the verdict
sentences) is kept as written. Spread is half the range over seeds, (max - min) / 2; a
difference between two methods is called resolved when it is larger than the sum of their
spreads, otherwise inconclusive."""
from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

TASK_ORDER = ["CoLA", "SST-2", "MRPC", "STS-B", "RTE"]
METHOD_ORDER = ["full", "lora", "peft-lora", "lora-ga", "vera", "peft-vera", "rosa-robust", "rosa"]
LABELS = {"full": "full fine-tuning", "lora": "LoRA (rosafx)", "peft-lora": "LoRA (HF PEFT)",
          "lora-ga": "LoRA-GA", "vera": "VeRA (rosafx)", "peft-vera": "VeRA (HF PEFT)",
          "rosa-robust": "RoSA (`rosa-robust`)", "rosa": "ROSA (`rosa`)"}
# What each task's cell shows: GLUE's own metrics, first one leads.
SHOWN = {"CoLA": ["matthews"], "SST-2": ["accuracy"], "MRPC": ["accuracy", "f1"], "STS-B": ["pearson", "spearman"],
         "RTE": ["accuracy"]}
HEADERS = {"CoLA": "CoLA MCC", "SST-2": "SST-2 acc", "MRPC": "MRPC acc / F1", "STS-B": "STS-B Pearson / Spearman",
           "RTE": "RTE acc"}
# Paper claims compared as "a >= b" or "a ~ b"; the verdict logic is in claim_rows.
CLAIMS = [
    ("VeRA ≈ LoRA (with ≥ 10× fewer parameters)", "vera", "lora", "approx"),
    ("LoRA-GA ends higher than LoRA", "lora-ga", "lora", "geq"),
    ("RoSA ≥ LoRA at equal parameter budget", "rosa-robust", "lora", "geq"),
    ("ROSA ≥ LoRA at the same rank", "rosa", "lora", "geq"),
    ("rosafx LoRA = HF PEFT LoRA (consistency check)", "lora", "peft-lora", "approx"),
    ("rosafx VeRA = HF PEFT VeRA (consistency check)", "vera", "peft-vera", "approx"),
]


def load_cells(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]


def final_value(cell: dict, metric: str) -> float:
    return cell["final"]["eval_" + metric]


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def by_task_method(cells: list[dict]) -> dict:
    grouped = defaultdict(list)
    for cell in cells:
        grouped[(cell["task"], cell["variant"])].append(cell)
    return grouped


def score(cells: list[dict], metric: str) -> tuple[float, float, int]:
    """(mean, spread, seeds) of the final validation metric."""
    mean, spread = mean_spread([final_value(c, metric) for c in cells])
    return mean, spread, len(cells)


def fmt(mean: float, spread: float, scale: float = 100.0) -> str:
    return f"{mean * scale:.1f} ± {spread * scale:.1f}"


def main_table(cells: list[dict]) -> str:
    grouped = by_task_method(cells)
    tasks = [t for t in TASK_ORDER if any(k[0] == t for k in grouped)]
    methods = [m for m in METHOD_ORDER if any(k[1] == m for k in grouped)]
    head = ["method", *[HEADERS[t] for t in tasks], "avg (lead metric)", "trainable params", "step time / LoRA",
            "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        row, leads = [LABELS.get(method, method)], []
        for task in tasks:
            group = grouped.get((task, method))
            if not group:
                row.append("–")
                continue
            parts = [fmt(*score(group, metric)[:2]) for metric in SHOWN[task]]
            leads.append(score(group, SHOWN[task][0])[0])
            row.append(" / ".join(parts))
        row.append(f"{statistics.fmean(leads) * 100:.1f}" if len(leads) == len(tasks) else "–")
        row.append(params_text(grouped, method, tasks))
        row.append(relative_step_time(grouped, method, tasks))
        rss = [c["peak_rss_mb"] for t in tasks for c in grouped.get((t, method), [])]
        row.append(f"{statistics.median(rss):.0f}" if rss else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def params_text(grouped: dict, method: str, tasks: list[str]) -> str:
    """The count with a 2-class head (STS-B's 1-output head has 385 fewer)."""
    counts = [c["trainable_params"] for t in tasks if t != "STS-B" for c in grouped.get((t, method), [])]
    counts = counts or [c["trainable_params"] for c in grouped.get(("STS-B", method), [])]
    return f"{max(counts):,}" if counts else "–"


def relative_step_time(grouped: dict, method: str, tasks: list[str]) -> str:
    """Median over (task, seed) of this cell's median step time over the matching LoRA cell's."""
    ratios = []
    for task in tasks:
        lora = {c["seed"]: c["step_seconds_median"] for c in grouped.get((task, "lora"), [])}
        for cell in grouped.get((task, method), []):
            if cell["seed"] in lora and lora[cell["seed"]]:
                ratios.append(cell["step_seconds_median"] / lora[cell["seed"]])
    return f"{statistics.median(ratios):.2f}" if ratios else "–"


def sampling_error(metric: str, value: float, rows: int) -> float:
    """Standard error of the difference of two independent estimates of ``metric`` on
    ``rows`` validation rows: √2 x the binomial SE for accuracy, √2 x (1 - r²)/√(n - 1)
    for a correlation (MCC, Pearson, Spearman)."""
    if not rows:
        return 0.0
    if metric in ("accuracy", "f1"):
        return math.sqrt(2 * value * (1 - value) / rows)
    return math.sqrt(2) * (1 - value * value) / math.sqrt(rows - 1)


def learned_nothing(cells: list[dict], task: str) -> bool:
    """Every seed predicts a constant (MCC 0) or, for regression, Pearson below 0.05."""
    if SHOWN[task][0] == "pearson":
        return all(final_value(c, "pearson") < 0.05 for c in cells)
    return all(abs(c["final"].get("eval_matthews", 1.0)) < 1e-9 for c in cells)


def claim_rows(cells: list[dict]) -> list[dict]:
    """Per claim and task: the gap (a - b) in the lead metric, the sum of spreads, the
    sampling error of a difference, and holds / does not hold / inconclusive."""
    grouped = by_task_method(cells)
    rows = []
    for claim, a, b, kind in CLAIMS:
        for task in TASK_ORDER:
            if (task, a) not in grouped or (task, b) not in grouped:
                continue
            metric = SHOWN[task][0]
            mean_a, spread_a, _ = score(grouped[(task, a)], metric)
            mean_b, spread_b, _ = score(grouped[(task, b)], metric)
            rows_valid = grouped[(task, b)][0].get("config", {}).get("valid", 0)
            sampling = sampling_error(metric, (mean_a + mean_b) / 2, rows_valid)
            gap, spreads = mean_a - mean_b, spread_a + spread_b
            nothing = learned_nothing(grouped[(task, a)], task) and learned_nothing(grouped[(task, b)], task)
            rows.append({"claim": claim, "task": task, "a": a, "b": b, "gap": gap, "spreads": spreads,
                         "sampling": sampling, "noise": max(spreads, sampling),
                         "verdict": "inconclusive (neither learned)" if nothing
                         else verdict(kind, gap, max(spreads, sampling))})
    return rows


def verdict(kind: str, gap: float, noise: float) -> str:
    if kind == "geq":
        return "holds" if gap > noise else ("does not hold" if gap < -noise else "inconclusive")
    # "approximately equal": holds unless a is resolvably worse (a resolvably better also agrees)
    return "does not hold" if gap < -noise else "holds"


def claims_table(cells: list[dict]) -> str:
    rows = claim_rows(cells)
    lines = ["| claim | task | gap (points) | spread sum | sampling error | verdict |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['claim']} | {row['task']} | {row['gap'] * 100:+.1f} | {row['spreads'] * 100:.1f} | "
                     f"{row['sampling'] * 100:.1f} | {row['verdict']} |")
    return "\n".join(lines)


def smoothed(values: list[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def mean_curve(cells: list[dict]) -> tuple[list[int], list[float]]:
    """Mean over seeds of the smoothed training loss, per step."""
    curves = [smoothed([row[1] for row in c["train_loss"]]) for c in cells]
    n = min(len(c) for c in curves)
    steps = [row[0] for row in cells[0]["train_loss"][:n]]
    return steps, [statistics.fmean(c[i] for c in curves) for i in range(n)]


def steps_to_target(cells_by_method: dict, reference: str = "lora") -> dict:
    """Per method: the first step where the seed-mean smoothed training loss reaches the
    reference method's final smoothed loss (None: never within the run)."""
    if reference not in cells_by_method:
        return {}
    target = mean_curve(cells_by_method[reference])[1][-1]
    out = {}
    for method, cells in cells_by_method.items():
        steps, curve = mean_curve(cells)
        out[method] = next((s for s, v in zip(steps, curve) if v <= target), None)
    return {"target_loss": target, **out}


def eval_curve(cells: list[dict], metric: str) -> tuple[list[int], list[float]]:
    per_seed = [{e["step"]: e["eval_" + metric] for e in c["evals"]} for c in cells]
    steps = sorted(set.intersection(*[set(p) for p in per_seed]))
    return steps, [statistics.fmean(p[s] for p in per_seed) for s in steps]


def steps_to_metric(cells_by_method: dict, metric: str, fraction: float = 0.95,
                    reference: str = "lora") -> dict:
    """Per method: the first evaluation step whose seed-mean metric reaches ``fraction`` of
    the reference method's final seed-mean metric."""
    if reference not in cells_by_method:
        return {}
    target = fraction * eval_curve(cells_by_method[reference], metric)[1][-1]
    out = {}
    for method, cells in cells_by_method.items():
        steps, curve = eval_curve(cells, metric)
        out[method] = next((s for s, v in zip(steps, curve) if v >= target), None)
    return {"target": target, **out}


def convergence_table(cells: list[dict], tasks: list[str]) -> str:
    grouped = by_task_method(cells)
    lines = ["| task | method | steps to LoRA's final train loss | steps to 95% of LoRA's final metric |",
             "|---|---|---|---|"]
    for task in tasks:
        methods = {m: grouped[(task, m)] for m in METHOD_ORDER if (task, m) in grouped}
        if not methods:
            continue
        by_loss = steps_to_target(methods)
        by_metric = steps_to_metric(methods, SHOWN[task][0])
        for method in methods:
            lines.append(f"| {task} | {LABELS.get(method, method)} | {by_loss.get(method) or 'not reached'} | "
                         f"{by_metric.get(method) or 'not reached'} |")
    return "\n".join(lines)


def sweep_table(cells: list[dict]) -> str:
    by_method = defaultdict(dict)
    for cell in cells:
        by_method[cell["variant"]][cell["lr"]] = final_value(cell, cell["metric"])
    lines = ["| method | LR → validation metric (seed 0) | chosen |", "|---|---|---|"]
    for method in [m for m in METHOD_ORDER if m in by_method]:
        results = by_method[method]
        best = max(results, key=results.get)
        text = ", ".join(f"{lr:g} → {value * 100:.1f}" for lr, value in sorted(results.items()))
        lines.append(f"| {LABELS.get(method, method)} | {text} | {best:g} |")
    return "\n".join(lines)


def plot_convergence(cells: list[dict], task: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grouped = by_task_method(cells)
    metric = SHOWN[task][0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for method in METHOD_ORDER:
        group = grouped.get((task, method))
        if not group:
            continue
        style = "--" if method.startswith("peft-") else "-"
        left.plot(*mean_curve(group), style, label=LABELS[method], linewidth=1.2)
        right.plot(*eval_curve(group, metric), style + "o", label=LABELS[method], linewidth=1.2, markersize=3)
    left.set(title=f"{task}: training loss (10-step mean, seed mean)", xlabel="step", ylabel="loss")
    right.set(title=f"{task}: validation {metric} (seed mean)", xlabel="step", ylabel=metric)
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- quality:{name} -->\n).*?(\n<!-- /quality:{name} -->)", re.S)
    if not pattern.search(text):
        return text + f"\n<!-- quality:{name} -->\n{body}\n<!-- /quality:{name} -->\n"
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


CONVERGENCE_TASKS = ["SST-2", "CoLA"]  # the tasks evaluated most often (bench/quality.py TASKS)


def build_report(results: Path, docs: Path, plots: bool = True) -> None:
    grid = load_cells(results / "grid")
    sweep = load_cells(results / "sweep")
    doc = docs / "quality.md"
    text = doc.read_text() if doc.exists() else "# Quality\n"
    sections = {"table": main_table(grid), "claims": claims_table(grid),
                "convergence": convergence_table(grid, CONVERGENCE_TASKS), "sweep": sweep_table(sweep)}
    for name, body in sections.items():
        text = replace_section(text, name, body)
    for task in CONVERGENCE_TASKS if plots else []:
        if any(c["task"] == task for c in grid):
            plot_convergence(grid, task, docs / "results" / "quality" / f"convergence-{task}.png")
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(doc)
