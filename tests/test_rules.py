"""Rule matching: exact > dot-suffix > regex > module type; None excludes; no match is an error."""
import pytest
import torch
from torch import nn

import rosafx
from rosafx.errors import RosafxError
from rosafx.graph.rules import resolve
from rosafx.graph.sites import Site

from captures import exported
from models import tiny_bert


def site(path, module_type="torch.nn.modules.linear.Linear"):
    return Site(path, path + ".weight", module_type, 4, 4, False, torch.float32)


SITES = [site("encoder.layer.0.attention.self.query"), site("encoder.layer.0.attention.self.value"),
         site("encoder.layer.0.output.dense"), site("h.0.attn.c_attn", "transformers.pytorch_utils.Conv1D")]


def test_dot_suffix_matches_whole_components_only():
    chosen = resolve({"query": "A", "dense": "B"}, SITES)
    assert chosen == {"encoder.layer.0.attention.self.query": "A", "encoder.layer.0.output.dense": "B"}
    assert resolve({"uery": "A"}, SITES) == {}


def test_regex_must_fully_match():
    chosen = resolve({r".*\.(query|value)": "A"}, SITES)
    assert set(chosen) == {"encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"}
    assert resolve({"encoder": "A"}, SITES) == {}


def test_precedence_exact_over_suffix_over_regex_over_type():
    rules = {nn.Linear: "type", ".*": "regex", "query": "suffix", "encoder.layer.0.attention.self.query": "exact"}
    chosen = resolve(rules, SITES)
    assert chosen["encoder.layer.0.attention.self.query"] == "exact"
    assert chosen["encoder.layer.0.attention.self.value"] == "regex"
    assert resolve({nn.Linear: "type"}, SITES).get("h.0.attn.c_attn") is None
    assert resolve({"type:Conv1D": "conv"}, SITES) == {"h.0.attn.c_attn": "conv"}


def test_none_excludes():
    chosen = resolve({".*": "A", "value": None}, SITES)
    assert "encoder.layer.0.attention.self.value" not in chosen and len(chosen) == 3


def test_no_match_names_nearest_sites():
    model, program, _ = exported(tiny_bert)
    with pytest.raises(RosafxError, match="query"):
        rosafx.transform(program, {"querry": {"method": "lora"}})


def test_unknown_method_and_option_are_clear_errors():
    model, program, _ = exported(tiny_bert)
    with pytest.raises(RosafxError, match="Known methods"):
        rosafx.transform(program, {"query": {"method": "lorax"}})
    with pytest.raises(RosafxError, match="Unknown option"):
        rosafx.transform(program, {"query": {"method": "lora", "rnak": 4}})
    with pytest.raises(RosafxError, match="rank"):
        rosafx.transform(program, {"query": {"method": "lora", "rank": 0}})


def test_config_object_is_accepted():
    from rosafx.methods.lora import LoraConfig
    model, program, _ = exported(tiny_bert)
    adapted = rosafx.transform(program, {"query": LoraConfig(rank=2, alpha=4)})
    assert len(adapted.meta["rosafx"]["sites"]) == 2
    assert adapted.meta["rosafx"]["plan"].sites["encoder.layer.0.attention.self.query"].rank == 2


def test_a_key_that_matches_nothing_is_an_error():
    """Even beside a key that matches (issue 23: `train --target TYPO` trained only its new head)."""
    model, program, _ = exported(tiny_bert)
    with pytest.raises(RosafxError, match="matches no linear site") as caught:
        rosafx.transform(program, {"query": {"method": "lora"}, r"bert\.encoder\..*": {"method": "lora"}})
    assert r"'bert\.encoder\..*'" in str(caught.value)
