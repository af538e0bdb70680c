"""`rosafx train --task causal-lm` on instruction data -> `rosafx evaluate` with perplexity on the
response tokens and exact match of greedy answers, end to end on a tiny random Llama with a
local BPE tokenizer; bad input exits 2 before RUN is written."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cli_runner import run_cli
from tiny_decoders import GSM8K_SAMPLE, save_decoder


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return save_decoder(tmp_path_factory.mktemp("llama") / "llama", "llama")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


TRAIN = ["--method", "lora", "--rank", "8", "--task", "causal-lm", "--batch-size", "8", "--max-length", "48"]


def test_train_then_evaluate_perplexity_and_exact_match(decoder, tmp_path, capsys):
    # every answer is "#### 7": learnable in a few steps, so exact match can be 1 on it and 0 on "#### 8"
    questions = [f"Tom has {i} apples and eats {i % 3}. How many are left?" for i in range(16)]
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": q, "a": "#### 7"} for q in questions])
    other = write_jsonl(tmp_path / "other.jsonl", [{"q": q, "a": "#### 8"} for q in questions])
    # the tiny model's final norm caps its logits near 0.6: its LM head trains in full to be able to learn
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"re:.*_proj": {"method": "lora", "rank": 8, "alpha": 16}, "lm_head": {"method": "full"}}))
    run = tmp_path / "run"
    assert run_cli("train", decoder, *TRAIN, "--rules", rules, "--data", train, "--eval", train, "--prompt-column", "q",
                   "--response-column", "a", "--max-steps", "40", "--lr", "5e-2", "-o", run) == 0
    final_eval = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()

    assert run_cli("evaluate", run, "--data", train, "--max-new-tokens", "6", "--extract", "gsm8k", "--json") == 0
    result = last_json(capsys)
    assert result["eval_perplexity"] == pytest.approx(final_eval["eval_perplexity"], rel=1e-5)  # the run's own
    assert math.isfinite(result["eval_perplexity"]) and result["eval_perplexity"] < 3.0   # from about 400: it learnt "#### 7</s>"
    assert result["exact_match"] >= 0.5 and result["generated"] == 16      # 0.6875 when written (40 steps)
    assert run_cli("evaluate", run, "--data", other, "--max-new-tokens", "6", "--extract", "gsm8k", "--json") == 0
    assert last_json(capsys)["exact_match"] == 0.0

    assert run_cli("evaluate", run, "--data", train) == 0   # the table: perplexity without generation
    printed = capsys.readouterr().out
    assert "eval_perplexity" in printed and "exact_match" not in printed


def test_gsm8k_sample_packed_runs_and_reports_exact_match(decoder, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", decoder, *TRAIN, "--data", GSM8K_SAMPLE, "--prompt-column", "question",
                   "--response-column", "answer", "--pack", "--max-steps", "2", "-o", run) == 0
    said = capsys.readouterr().out
    assert said.count("prompt(s) lost their first tokens") == 1      # truncation said once
    assert run_cli("evaluate", run, "--data", GSM8K_SAMPLE, "--max-new-tokens", "4", "--extract", "gsm8k",
                   "--json") == 0
    result = last_json(capsys)
    assert math.isfinite(result["eval_perplexity"]) and 0.0 <= result["exact_match"] <= 1.0
    # the export takes plain 2-D masks (a packed capture takes 4-D ones) and keeps the run's columns:
    # the ONNX scores the same rows with the run's perplexity
    out = tmp_path / "out"
    assert run_cli("export", run, "--merge", "-o", out) == 0
    capsys.readouterr()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(GSM8K_SAMPLE.read_text().splitlines(keepends=True)[:8]))
    assert run_cli("evaluate", run, "--data", rows, "--json") == 0
    from_run = last_json(capsys)
    assert run_cli("evaluate", out / "model.onnx", "--data", rows, "--json") == 0
    assert last_json(capsys)["eval_perplexity"] == pytest.approx(from_run["eval_perplexity"], rel=1e-4)


@pytest.mark.parametrize("extra, says", [
    (["--prompt-column", "question", "--response-column", "solution"], "no column 'solution' (--response-column)"),
    (["--prompt-column", "question", "--response-column", "answer", "--pack", "--compile"], "--pack with --compile"),
])
def test_bad_input_exits_2_before_run_is_written(decoder, tmp_path, capsys, extra, says):
    run = tmp_path / "run"
    assert run_cli("train", decoder, *TRAIN, "--data", GSM8K_SAMPLE, *extra, "--max-steps", "1", "-o", run) == 2
    err = capsys.readouterr().err
    assert says in err and not run.exists()


def test_a_tokenizer_without_eos_exits_2(tmp_path, capsys):
    model = save_decoder(tmp_path / "noeos", "llama", eos=False)
    assert run_cli("train", model, *TRAIN, "--data", GSM8K_SAMPLE, "--max-steps", "1", "-o", tmp_path / "run") == 2
    assert "has no EOS token" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_chat_rows_with_a_chat_template_train_and_evaluate(tmp_path, capsys):
    from tiny_decoders import CHATML
    model = save_decoder(tmp_path / "chat", "llama", chat_template=CHATML)
    rows = [{"conversation": [{"role": "system", "content": "Answer with a number."},
                              {"role": "user", "content": f"What is {i} plus 1?"},
                              {"role": "assistant", "content": f"#### {i + 1}"}]} for i in range(8)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    run = tmp_path / "run"
    assert run_cli("train", model, *TRAIN, "--data", data, "--messages-column", "conversation", "--max-steps", "2",
                   "-o", run) == 0
    assert json.loads((run / "run.json").read_text())["config"]["messages_column"] == "conversation"
    capsys.readouterr()
    assert run_cli("evaluate", run, "--data", data, "--max-new-tokens", "3", "--extract", "gsm8k", "--json") == 0
    result = last_json(capsys)
    assert math.isfinite(result["eval_perplexity"]) and result["generated"] == 8 and 0 <= result["exact_match"] <= 1
