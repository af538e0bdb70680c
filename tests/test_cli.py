"""The CLI end to end on tiny models: HF directory, .pt2 and pickled .pt inputs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cli_runner import run_cli

from models import functional_linear, tiny_bert


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    tiny_bert()[0].save_pretrained(path)
    return path


def test_adapt_then_export_hf_directory(hf_dir, tmp_path, capsys):
    assert run_cli("adapt", hf_dir, "--method", "lora", "--target", "query", "--target", "value",
                   "--rank", "4", "--alpha", "8", "-o", tmp_path / "out") == 0
    record = json.loads((tmp_path / "out" / "rosafx.json").read_text())
    assert len(record["sites"]) == 4 and all(s["config"]["rank"] == 4 for s in record["sites"].values())
    assert json.loads((tmp_path / "out" / "source.json").read_text())["kind"] == "hf"
    assert run_cli("export", tmp_path / "out", "--merge", "-o", tmp_path / "model.onnx") == 0
    assert (tmp_path / "model.onnx").exists()
    assert "parity vs torch" in capsys.readouterr().out


def test_default_target_skips_heads_and_rules_file(hf_dir, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"dense": {"method": "lora", "rank": 2}, "pooler.dense": None}))
    assert run_cli("adapt", hf_dir, "--rules", rules, "-o", tmp_path / "a") == 0
    sites = json.loads((tmp_path / "a" / "rosafx.json").read_text())["sites"]
    assert sites and not any(p.startswith("pooler") for p in sites)
    assert all(p.endswith("dense") for p in sites)
    assert run_cli("adapt", hf_dir, "--method", "lora", "-o", tmp_path / "b") == 0
    sites = json.loads((tmp_path / "b" / "rosafx.json").read_text())["sites"]
    assert "encoder.layer.0.attention.self.query" in sites and "pooler.dense" not in sites


def test_pt2_and_pickle_inputs(tmp_path):
    model, example = functional_linear()
    torch.export.save(torch.export.export(model, example), tmp_path / "m.pt2")
    assert run_cli("adapt", tmp_path / "m.pt2", "--method", "lora", "--target", "proj", "-o", tmp_path / "a") == 0
    assert run_cli("export", tmp_path / "a", "-o", tmp_path / "m.onnx") == 0
    torch.save({"model": model, "example_inputs": example}, tmp_path / "m.pt")
    assert run_cli("adapt", tmp_path / "m.pt", "--method", "lora", "--target", "proj", "-o", tmp_path / "b") == 2
    assert not (tmp_path / "b").exists()
    assert run_cli("adapt", tmp_path / "m.pt", "--method", "lora", "--target", "proj", "--trust-pickle",
                   "-o", tmp_path / "b") == 0


def test_inspect_and_methods(hf_dir, capsys):
    assert run_cli("inspect", hf_dir) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in out and "sites" in out
    assert run_cli("inspect", hf_dir, "--method", "lora", "--target", "query", "--rank", "2") == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 256" in out  # 2 query sites x rank 2 x (32 in + 32 out)
    assert "plan" in out and "rank=2" in out  # the plan, with each site's options
    assert run_cli("methods") == 0
    assert "lora" in capsys.readouterr().out


def test_errors_exit_2_without_traceback(hf_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ROSAFX_DEBUG"}
    cases = [
        ["adapt", str(tmp_path / "missing"), "--method", "lora", "-o", str(tmp_path / "x")],
        ["adapt", str(hf_dir), "--method", "lora", "--target", "querry", "-o", str(tmp_path / "x")],
        ["adapt", str(hf_dir), "-o", str(tmp_path / "x")],
        ["export", str(tmp_path), "-o", str(tmp_path / "x.onnx")],
    ]
    for argv in cases:
        result = subprocess.run([sys.executable, "-m", "rosafx.cli.main", *argv], capture_output=True, text=True,
                                env=env)
        assert result.returncode == 2, (argv, result.stderr)
        assert "Traceback (most recent call last)" not in result.stderr and "\nerror: " in "\n" + result.stderr, \
            result.stderr
    assert not (tmp_path / "x").exists()


def test_adapt_rosa_then_export(hf_dir, tmp_path):
    assert run_cli("adapt", hf_dir, "--method", "rosa", "--rank", "4", "-o", tmp_path / "rosa") == 0
    record = json.loads((tmp_path / "rosa" / "rosafx.json").read_text())
    assert {s["config"]["method"] for s in record["sites"].values()} == {"rosa"}
    assert run_cli("export", tmp_path / "rosa", "--merge", "-o", tmp_path / "rosa.onnx") == 0
    assert (tmp_path / "rosa.onnx").exists()
