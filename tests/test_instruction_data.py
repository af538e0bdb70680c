"""Instruction data for causal-lm (rosafx/recipes/data/instructions.py): prompt + response
columns and chat rows (the tokenizer's chat template, the plain template), EOS at the end of
every response, prompt tokens masked, left truncation, and the errors. References are built
independently: the texts tokenised by hand, the loss computed per example in float64."""
from __future__ import annotations

import json

import pytest
import torch

from rosafx.errors import RosafxError
from rosafx.recipes.data import Batches, encode, examples_from, loss_for, read_table
from rosafx.recipes.data.instructions import truncation_note
from tiny_decoders import CHATML, GSM8K_SAMPLE, bpe_tokenizer, gsm8k_rows, tiny_decoder


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    return bpe_tokenizer(chat_template=CHATML)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_columns_are_found_and_only_response_tokens_are_labelled(tokenizer):
    rows = gsm8k_rows()[:6]
    examples = examples_from(read_table(GSM8K_SAMPLE), "causal-lm")
    assert examples.columns == {"prompt": "question", "response": "answer"} and len(examples) == 64
    encoded = encode(examples, tokenizer, 512)
    batch = Batches(encoded, 6).batch(torch.arange(6))
    eos = tokenizer.eos_token_id
    for i, row in enumerate(rows):
        prompt = tokenizer(row["question"] + "\n")["input_ids"]
        response = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [eos]
        n = len(prompt) + len(response)
        assert batch["input_ids"][i, :n].tolist() == prompt + response
        assert batch["labels"][i, :n].tolist() == [-100] * len(prompt) + response   # the loss sees the response
        assert (batch["labels"][i, n:] == -100).all() and (batch["attention_mask"][i, n:] == 0).all()


def test_loss_covers_response_tokens_only_float64(tokenizer):
    """The batch loss equals, in float64, the mean NLL of every response token computed example by example."""
    examples = examples_from(read_table(GSM8K_SAMPLE), "causal-lm")
    encoded = encode(examples, tokenizer, 256)
    model = tiny_decoder("llama", len(tokenizer)).double()
    batch = Batches(encoded, 4).batch(torch.arange(4))
    loss = loss_for("causal-lm")(model, batch)
    total, count = 0.0, 0
    for i in range(4):
        tokens = encoded.tokens(i)
        start = int(encoded.prompt_lengths[i])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].double(), -1)
        for t in range(start, len(tokens)):   # token t predicted at position t - 1
            total -= float(logp[t - 1, tokens[t]])
            count += 1
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-10)


def test_chat_rows_with_the_tokenizers_template_and_the_plain_one(tmp_path, tokenizer, chat_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "#### 4"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    examples = examples_from(read_table(path), "causal-lm")
    assert examples.columns == {"messages": "messages"} and examples.responses == ["#### 4"]

    templated = encode(examples, chat_tokenizer, 128)
    expected_prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    prompt = chat_tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
    response = chat_tokenizer("#### 4<|im_end|>", add_special_tokens=False)["input_ids"] + [chat_tokenizer.eos_token_id]
    assert templated.tokens(0) == prompt + response and int(templated.prompt_lengths[0]) == len(prompt)

    plain = encode(examples, tokenizer, 128)   # no chat template: "role: content" lines, then "assistant: "
    prompt = tokenizer("system: Be brief.\nuser: 2 + 2?\nassistant: ")["input_ids"]
    assert plain.tokens(0) == prompt + tokenizer("#### 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert int(plain.prompt_lengths[0]) == len(prompt)


def test_long_prompts_lose_their_first_tokens_and_it_is_said_once(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "one two three four five six seven eight nine ten " * 4,
                                                "response": "yes"}, {"prompt": "hi", "response": "no"}])
    encoded = encode(examples_from(read_table(path), "causal-lm"), tokenizer, 12)
    response = tokenizer("yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    whole_prompt = tokenizer("one two three four five six seven eight nine ten " * 4 + "\n")["input_ids"]
    assert encoded.tokens(0) == whole_prompt[-(12 - len(response)):] + response   # cut from the left
    assert encoded.truncated_prompts == 1 and encoded.truncated_responses == 0
    note = truncation_note(encoded, 12)
    assert note.count("\n") == 0 and "1 prompt(s) lost their first tokens" in note and "--max-length 12" in note
    assert truncation_note(encode(examples_from(read_table(path), "causal-lm"), tokenizer, 512), 512) is None


@pytest.mark.parametrize("rows, flags, says", [
    ([{"question": "q", "reply": "a"}], {"prompt_column": "question", "response_column": "answer"},
     "no column 'answer' (--response-column)"),
    ([{"question": "q", "answer": "a"}], {"prompt_column": "question"}, "--prompt-column needs --response-column"),
    ([{"question": "q", "answer": "a"}, {"question": "q", "answer": "  "}], {}, "line 2: the response ('answer') is empty"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], {}, "ends with a 'user' message"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}], {},
     "ends with an empty assistant message"),
    ([{"messages": "hi"}], {}, "holds str, not a list of messages"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], {}, "message 1 has the role 'robot'"),
])
def test_bad_rows_are_one_line_errors(tmp_path, rows, flags, says):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RosafxError, match=None) as info:
        examples_from(read_table(path), "causal-lm", **flags)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    examples = examples_from(read_table(GSM8K_SAMPLE), "causal-lm")
    with pytest.raises(RosafxError, match="has no EOS token"):
        encode(examples, bpe_tokenizer(eos=False), 64)


def test_cache_keeps_prompt_lengths(tmp_path, tokenizer):
    examples = examples_from(read_table(GSM8K_SAMPLE), "causal-lm")
    first = encode(examples, tokenizer, 64, tmp_path)
    again = encode(examples, tokenizer, 64, tmp_path)   # read from the cache
    assert torch.equal(first.prompt_lengths, again.prompt_lengths) and again.truncated_prompts == first.truncated_prompts
