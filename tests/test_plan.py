"""The plan: explicit key kinds through one matcher, full modules by the same rules, a plan
that round-trips through to_dict/from_dict, and load paths that capture once."""
import pytest
import torch
from torch import nn

import rosafx
import importlib
from rosafx.graph.adapted_graph import adapters_of, plan_of
from rosafx.errors import RosafxError
from rosafx.graph.plan import Plan
from rosafx.graph.rules import Key, Kind, parse_key, resolve
from rosafx.graph.sites import Site

LORA = {"method": "lora", "rank": 2, "alpha": 4}


def site(path, module_type="torch.nn.modules.linear.Linear"):
    return Site(path, path + ".weight", module_type, 4, 4, False, torch.float32)


SITES = [site("encoder.layer.0.attention.self.query"), site("encoder.layer.0.output.dense"),
         site("encoderXlayer.0.output.dense")]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"query": nn.Linear(6, 6), "value": nn.Linear(6, 6)})
        self.head = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.encoder["query"](x) + self.encoder["value"](x))


EXAMPLE = (torch.randn(2, 6),)


def test_each_key_has_one_kind():
    assert parse_key(nn.Linear) == Key(Kind.TYPE, "Linear")
    assert parse_key("type:Conv1D") == Key(Kind.TYPE, "Conv1D")
    assert parse_key("encoder.layer.0.output.dense") == Key(Kind.SUFFIX, "encoder.layer.0.output.dense")
    assert parse_key(r".*\.dense") == Key(Kind.REGEX, r".*\.dense")
    assert parse_key("re:encoder") == Key(Kind.REGEX, "encoder")
    assert parse_key("path:output.dense") == Key(Kind.EXACT, "output.dense")


def test_a_plain_dotted_key_is_not_a_regex():
    # as a regex its dots would also match "encoderXlayer..."; as a suffix they are dots
    assert set(resolve({"encoder.layer.0.output.dense": "A"}, SITES)) == {"encoder.layer.0.output.dense"}
    assert set(resolve({"re:encoder.layer.0.output.dense": "A"}, SITES)) == {
        "encoder.layer.0.output.dense", "encoderXlayer.0.output.dense"}


def test_explicit_exact_path_beats_everything_and_is_not_a_suffix():
    assert resolve({"path:output.dense": "A"}, SITES) == {}
    chosen = resolve({"path:encoder.layer.0.output.dense": "exact", "encoder.layer.0.output.dense": "suffix"}, SITES)
    assert chosen == {"encoder.layer.0.output.dense": "exact"}


def test_full_modules_use_the_same_rules_none_excludes_and_typos_are_errors():
    model = Net()
    adapted = rosafx.transform(model, {"query": LORA, "re:head\\.\\d": {"method": "full"}, "head.1": None},
                               example_inputs=EXAMPLE)
    assert plan_of(adapted).full == ["head.0"] and set(plan_of(adapted).sites) == {"encoder.query"}
    with pytest.raises(RosafxError, match="'haed' .*matches no module"):  # issue 23: an error everywhere
        rosafx.transform(model, {"query": LORA, "haed": {"method": "full"}}, example_inputs=EXAMPLE)
    with pytest.raises(RosafxError, match="both adapted and inside a 'full' module"):
        rosafx.transform(model, {nn.Linear: LORA, "head": {"method": "full"}}, example_inputs=EXAMPLE)
    by_type = rosafx.transform(model, {nn.Linear: LORA, "head": {"method": "full"}, "re:head\\..*": None},
                               example_inputs=EXAMPLE)
    assert plan_of(by_type).full == ["head"] and set(plan_of(by_type).sites) == {"encoder.query", "encoder.value"}


def test_plan_round_trips_and_is_the_adapters_config():
    adapted = rosafx.transform(Net(), {"query": LORA, "value": {"method": "rosa", "rank": 2}, "head.1": "full"},
                               example_inputs=EXAMPLE)
    plan = plan_of(adapted)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert all(adapters_of(adapted)[p].config is c for p, c in plan.sites.items())  # one copy


def test_load_and_load_peft_capture_once(tmp_path, monkeypatch):
    model = Net()
    adapted = rosafx.transform(model, {"query": LORA, "value": LORA}, example_inputs=EXAMPLE)
    rosafx.save(adapted, tmp_path / "rosafx")
    rosafx.save(adapted, tmp_path / "peft", format="peft")
    calls = []
    transform_module = importlib.import_module("rosafx.pipeline.transform")  # rosafx.transform is also the function
    real = transform_module.capture
    monkeypatch.setattr(transform_module, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 6)
    for directory in ("rosafx", "peft"):
        calls.clear()
        loaded = rosafx.load(model, tmp_path / directory, example_inputs=EXAMPLE)
        assert len(calls) == 1
        assert plan_of(loaded) == plan_of(adapted)
        assert torch.equal(loaded(x), adapted(x))


def test_a_saved_plan_naming_a_missing_site_is_refused(tmp_path):
    adapted = rosafx.transform(Net(), {"query": LORA}, example_inputs=EXAMPLE)
    rosafx.save(adapted, tmp_path / "a")
    with pytest.raises(RosafxError, match="encoder.query"):
        rosafx.load(nn.Sequential(nn.Linear(6, 6)), tmp_path / "a", example_inputs=EXAMPLE)


@pytest.mark.parametrize("method, allowed", [("lora", 4), ("rosa", 4), ("vera", 16)])
def test_each_method_declares_its_rank_limit(method, allowed):
    """min(in, out) for a low-rank factor; VeRA's shared pair may be 4·max(in, out) wide (the
    paper's r = 1024 on 768-wide layers). The 4 x 4 sites above."""
    query = SITES[:1]
    modules = {"encoder.layer.0.attention.self.query": "Linear"}
    Plan.from_rules({"query": {"method": method, "rank": allowed}}, query, modules).check(query, modules)
    too_wide = Plan.from_rules({"query": {"method": method, "rank": allowed + 1}}, query, modules)
    with pytest.raises(RosafxError, match=f"rank {allowed + 1} .* exceeds the largest useful rank {allowed}"):
        too_wide.check(query, modules)
