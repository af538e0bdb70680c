"""Answer extractors and exact match (rosafx/recipes/data/extractors.py) on the GSM8K sample,
against the answers read by hand from each row's last line; greedy answers with the KV cache
(rosafx/recipes/greedy_answers.py) against a plain argmax loop without a cache."""
from __future__ import annotations

import pytest
import torch

from rosafx.errors import RosafxError
from rosafx.recipes.data.extractors import exact_match, extractor
from tiny_decoders import bpe_tokenizer, gsm8k_rows, tiny_decoder


def test_gsm8k_preset_reads_the_number_after_the_marks():
    gsm8k = extractor("gsm8k")
    for row in gsm8k_rows():
        last = row["answer"].splitlines()[-1]
        assert last.startswith("#### ")
        assert gsm8k(row["answer"]) == last[5:].replace(",", "").strip()
    assert gsm8k("so 3 + 4 = 7\n#### 1,234") == "1234" and gsm8k("#### -2.5") == "-2.5"
    assert gsm8k("the answer is 7") is None


def test_user_pattern_presets_and_exact_match():
    answer = extractor(r"answer is (\w+)")
    assert answer("The answer is blue.") == "blue" and answer("no idea") is None
    assert extractor(r"\d+")("a 12 b 13") == "12"                    # no group: the whole (first) match
    assert extractor("last-number")("a 12 b 1,300") == "1300"
    references = ["x\n#### 7", "#### 8", "#### 1,000"]
    assert exact_match(["#### 7", "#### 9", "so #### 1000"], references, extractor("gsm8k")) == pytest.approx(2 / 3)
    assert exact_match([" #### 7 ", "#### 9"], ["#### 7", "#### 8"], extractor(None)) == 0.5   # whole text, stripped
    with pytest.raises(RosafxError, match="Row 1's reference response has no answer"):
        exact_match(["7"], ["seven"], extractor("gsm8k"))
    with pytest.raises(RosafxError, match="neither a preset .* nor a valid regular expression"):
        extractor("([a")


def test_greedy_answers_with_the_cache_equal_an_argmax_loop_without_one():
    from rosafx.recipes.greedy_answers import greedy_answers
    tokenizer = bpe_tokenizer()
    model = tiny_decoder("llama", len(tokenizer), seed=3)
    eos = tokenizer.eos_token_id
    with torch.no_grad():   # make EOS likely after a few tokens, so stopping at EOS is exercised
        model.lm_head.weight[eos] *= 4
    prompts = [tokenizer(q)["input_ids"] for q in ("How many apples", "Weng earns $12 an hour", "x")]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=7, batch_size=2, progress=False)
    stopped = []
    for prompt, answer in zip(prompts, answers):
        ids = list(prompt)
        new = []
        for _ in range(7):
            with torch.no_grad():
                token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
            new.append(token)
        stopped.append(len(new) < 7)
        assert answer == tokenizer.decode(new, skip_special_tokens=True)
    assert any(stopped) and not all(stopped)   # rows that stop at EOS and rows that run to max_new_tokens


def test_generation_prompts_do_not_depend_on_the_reference_and_fit_the_positions(tmp_path):
    import json

    from rosafx.recipes.data import examples_from, read_table
    from rosafx.recipes.greedy_answers import generation_prompts
    tokenizer = bpe_tokenizer()
    question = "one two three four five six seven eight nine ten"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": question, "a": "#### 1"}) + "\n" + json.dumps({"q": question, "a": "#### 1" * 9}) + "\n")
    examples = examples_from(read_table(path), "causal-lm", prompt_column="q", response_column="a")
    whole = tokenizer(question + "\n")["input_ids"]
    short, long = generation_prompts(examples, tokenizer, 64, 8, None)
    assert short == long == whole                                   # the reference's length plays no part
    assert generation_prompts(examples, tokenizer, 6, 8, None)[0] == whole[-5:]          # max_length - 1, from the left
    assert generation_prompts(examples, tokenizer, 64, 8, 12)[0] == whole[-4:]           # 12 positions - 8 new tokens
    with pytest.raises(RosafxError, match="leaves no room for a prompt"):
        generation_prompts(examples, tokenizer, 64, 12, 12)
