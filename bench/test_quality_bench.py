"""bench/quality.py's parts that need neither ../shared nor training: the train/validation
split of a GLUE TSV, and the report builder over cell JSONs (synthetic ones here). It lives
beside the code it tests; `make test` collects bench/ as well as tests/ (pyproject's testpaths)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quality_report import build_report, claim_rows, main_table, steps_to_target
from quality_split import split_task

BOM = "\ufeff"


def write_tsv(path: Path, header: str | None, rows: int) -> list[str]:
    lines = [f"{i % 2}\t{1000 + i}\t{2000 + i}\tsentence {i} \" odd quote\tother {i}" for i in range(rows)]
    path.write_text("\n".join(([header] if header else []) + lines) + "\n", encoding="utf-8")
    return lines


def read_rows(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_split_is_deterministic_disjoint_and_keeps_the_layout(tmp_path):
    header = BOM + "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"  # MRPC's header, byte-order mark included
    lines = write_tsv(tmp_path / "train.tsv", header, 50)
    first = split_task(tmp_path / "train.tsv", tmp_path / "a", "MRPC", 10, None, seed=0)
    split_task(tmp_path / "train.tsv", tmp_path / "b", "MRPC", 10, None, seed=0)
    split_task(tmp_path / "train.tsv", tmp_path / "c", "MRPC", 10, None, seed=1)
    assert first == {"source_rows": 50, "train_rows": 40, "valid_rows": 10, "split_seed": 0}
    for name in ("train.tsv", "valid.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, valid = read_rows(tmp_path / "a" / "train.tsv"), read_rows(tmp_path / "a" / "valid.tsv")
    assert train[0] == header and valid[0] == header
    assert not set(train[1:]) & set(valid[1:])
    assert sorted(train[1:] + valid[1:]) == sorted(lines)
    assert train[1:] == [line for line in lines if line in set(train[1:])]  # file order kept
    assert read_rows(tmp_path / "c" / "valid.tsv") != valid  # another seed, another split


def test_split_of_headerless_cola_with_a_training_subset(tmp_path):
    lines = [f"gj04\t{i % 2}\t\tsentence {i}" for i in range(30)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    split_task(tmp_path / "train.tsv", tmp_path / "out", "CoLA", 5, 12, seed=3)
    train, valid = read_rows(tmp_path / "out" / "train.tsv"), read_rows(tmp_path / "out" / "valid.tsv")
    assert (len(train), len(valid)) == (12, 5)
    assert not set(train) & set(valid) and set(train) | set(valid) <= set(lines)


def cell(task, variant, seed, value, *, params=100, step=0.5, losses=(1.0, 0.8, 0.6, 0.4)):
    metric = {"RTE": "accuracy", "MRPC": "accuracy"}[task]
    final = {"step": len(losses), "eval_loss": 0.5, "eval_accuracy": value, "eval_f1": value - 0.1,
             "eval_matthews": 0.0 if value == 0.5 else 0.2}
    return {"task": task, "variant": variant, "seed": seed, "lr": 1e-3, "metric": metric,
            "trainable_params": params, "step_seconds_median": step, "peak_rss_mb": 900.0,
            "train_loss": [[i + 1, loss, float(i)] for i, loss in enumerate(losses)],
            "evals": [{"step": 2, "eval_accuracy": value / 2, "eval_f1": 0.0}, final], "final": final}


CELLS = [cell("RTE", "lora", 0, 0.60), cell("RTE", "lora", 1, 0.64),
         cell("RTE", "vera", 0, 0.50, params=10, step=0.75), cell("RTE", "vera", 1, 0.52, params=10, step=0.75),
         cell("RTE", "rosa", 0, 0.61, losses=(1.0, 0.5, 0.3, 0.2)),
         cell("RTE", "rosa", 1, 0.65, losses=(1.0, 0.5, 0.3, 0.2))]


def test_report_rows_from_synthetic_cells():
    table = main_table(CELLS).splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert table[0].startswith("| method | RTE acc |")
    assert rows["LoRA (rosafx)"] == "| LoRA (rosafx) | 62.0 ± 2.0 | 62.0 | 100 | 1.00 | 900 |"
    assert rows["VeRA (rosafx)"] == "| VeRA (rosafx) | 51.0 ± 1.0 | 51.0 | 10 | 1.50 | 900 |"
    verdicts = {(r["a"], r["b"]): r["verdict"] for r in claim_rows(CELLS)}
    assert verdicts[("vera", "lora")] == "does not hold"   # 11 points worse, spreads sum to 3
    assert verdicts[("rosa", "lora")] == "inconclusive"    # +1 point, spreads sum to 4


def test_verdicts_weigh_the_validation_size_and_constant_predictions():
    def vera_verdict(rows):
        return [r["verdict"] for r in claim_rows([{**c, "config": {"valid": rows}} for c in CELLS]) if r["a"] == "vera"]
    assert vera_verdict(100_000) == ["does not hold"]  # 11 points worse; spreads 3, sampling error 0.2
    assert vera_verdict(20) == ["holds"]  # √(2·0.56·0.44/20) = 15.7 points: "≈" cannot be rejected
    constant = [cell("RTE", v, s, 0.5) for v in ("lora", "rosa") for s in (0, 1)]
    assert [r["verdict"] for r in claim_rows(constant)] == ["inconclusive (neither learned)"]


def test_steps_to_target_uses_the_reference_final_smoothed_loss():
    by_method = {"lora": CELLS[:2], "rosa": CELLS[4:]}
    result = steps_to_target(by_method)
    assert result["target_loss"] == pytest.approx((1.0 + 0.8 + 0.6 + 0.4) / 4)
    assert result["lora"] == 4 and result["rosa"] == 3   # rosa's 10-step mean 0.6 at step 3 <= 0.7


def test_build_report_keeps_prose_and_replaces_the_sections(tmp_path):
    results = tmp_path / "results"
    (results / "grid").mkdir(parents=True)
    (results / "sweep").mkdir()
    for i, c in enumerate(CELLS + [{**cell("MRPC", "lora", s, 0.7 + s / 100)} for s in (0, 1)]):
        (results / "grid" / f"{i}.json").write_text(json.dumps(c))
    (results / "sweep" / "a.json").write_text(json.dumps(CELLS[0]))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "quality.md").write_text("# Q\nprose stays\n<!-- quality:table -->\nOLD-TABLE\n"
                                     "<!-- /quality:table -->\nend\n")
    build_report(results, docs, plots=False)  # matplotlib alone takes seconds to import
    text = (docs / "quality.md").read_text()
    assert "prose stays" in text and "OLD-TABLE" not in text and text.rstrip().endswith("<!-- /quality:sweep -->")
    assert "| LoRA (rosafx) | 70.5 ± 0.5 / 60.5 ± 0.5 | 62.0 ± 2.0 |" in text
