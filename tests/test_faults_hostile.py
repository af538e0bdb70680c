"""Fault matrix, hostile files: a .pt2, source.json or model directory from a stranger runs
no code unless the user passes --trust-pickle. Each payload would create a marker file;
the marker's absence is the proof. The last rows show the payloads are live (torch's own
loader, or --trust-pickle, runs them)."""
import json
import zipfile

import pytest
import torch

import hostile
from faults_common import assert_user_error, cli, copy_tree, snapshot
from rosafx.errors import RosafxError
from rosafx.io.pt2 import load_pt2


def _sym_expression(marker):
    def change(program):
        sizes = next(iter(program["graph_module"]["graph"]["tensor_values"].values()))["sizes"]
        sizes[0] = {"as_expr": {"expr_str": hostile.code(marker), "hint": {"as_int": 3}}}
    return change


def _node_target(marker):
    def change(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.load_library"
    return change


def _arg_names(marker):
    def change(program):
        for entry in program["graph_module"]["module_call_graph"]:
            if entry["signature"] and entry["signature"].get("forward_arg_names"):
                entry["signature"]["forward_arg_names"][0] = f"x={hostile.code(marker)}"
    return change


def _pytree_type(marker):
    def change(program):
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        assert '"builtins.tuple"' in signature["in_spec"]
        signature["in_spec"] = signature["in_spec"].replace('"builtins.tuple"', '"antigravity.Fly"', 1)
    return change


def _with_entry(name, data):
    def build(src, dst, marker):
        edit = lambda entry, payload: payload  # noqa: E731
        edit.extra = {name: data(marker)}
        return hostile.rewrite(src, dst, edit)
    return build


ARCHIVE_ROWS = {  # row -> (build(src, dst, marker), words the message must hold)
    "pickled weight": (hostile.pickled_weight, ["proj", "pickle", "--trust-pickle"]),
    "opaque constant": (hostile.opaque_constant, ["evil", "pickle", "--trust-pickle"]),
    "pickled sample inputs": (hostile.pickled_sample_inputs, ["sample inputs", "--trust-pickle"]),
    "sympy expression": (lambda s, d, m: hostile.model_json(s, d, _sym_expression(m)), ["__import__"]),
    "node target": (lambda s, d, m: hostile.model_json(s, d, _node_target(m)), ["torch.ops.load_library"]),
    "argument name": (lambda s, d, m: hostile.model_json(s, d, _arg_names(m)), ["forward_arg_names"]),
    "unknown pytree type": (lambda s, d, m: hostile.model_json(s, d, _pytree_type(m)), ["antigravity.Fly"]),
    "AOTInductor library": (_with_entry("data/aotinductor/model/model.so", lambda m: b"\x7fELF"),
                            ["data/aotinductor/model/model.so"]),
    "legacy pickled weights": (_with_entry("data/weights/model.pt", hostile.torch_pickle_payload),
                               ["data/weights/model.pt", "--trust-pickle"]),
}


@pytest.mark.parametrize("row", list(ARCHIVE_ROWS))
def test_hostile_pt2_runs_no_code(row, fault_models, tmp_path, capsys):
    build, words = ARCHIVE_ROWS[row]
    marker = tmp_path / "marker"
    archive = build(fault_models["pt2"], tmp_path / "hostile.pt2", marker)
    result = cli(capsys, "adapt", archive, "--method", "lora", "-o", tmp_path / "out")
    assert_user_error(result, *words)
    assert not marker.exists(), "code from the archive ran"
    assert not (tmp_path / "out").exists()
    with pytest.raises(RosafxError):
        load_pt2(archive)
    assert not marker.exists()


def test_guard_code_is_dropped_not_run(fault_models, tmp_path, capsys):
    """Guard code becomes Python source in ep.module(); a clean reader drops it."""
    marker = tmp_path / "marker"
    archive = hostile.model_json(fault_models["pt2"], tmp_path / "g.pt2",
                                 lambda program: program.__setitem__("guards_code", [hostile.code(marker)]))
    assert cli(capsys, "inspect", archive).code == 0
    assert not marker.exists()
    torch.export.load(archive).module()(*fault_models["example"])  # control: torch's loader runs it
    assert marker.exists()


def test_trust_pickle_is_what_allows_pickled_weights(fault_models, tmp_path, capsys):
    """Control row: the payload is live, and --trust-pickle (only it) lets it run."""
    marker = tmp_path / "marker"
    archive = hostile.pickled_weight(fault_models["pt2"], tmp_path / "w.pt2", marker)
    cli(capsys, "inspect", archive, "--trust-pickle")
    assert marker.exists()


def _adapter_with_source(fault_models, tmp_path, source) -> object:
    adapter = copy_tree(fault_models["adapter"], tmp_path / "adapter")
    (adapter / "source.json").write_text(json.dumps(source) if not isinstance(source, str) else source)
    return adapter


def test_source_json_cannot_widen_trust(fault_models, tmp_path, capsys):
    """source.json names a pickle: it still needs the user's own --trust-pickle."""
    marker = tmp_path / "marker"
    torch.save(hostile.Marker(marker), tmp_path / "model.pt")
    adapter = _adapter_with_source(fault_models, tmp_path, {"path": str(tmp_path / "model.pt"), "kind": "pickle"})
    assert_user_error(cli(capsys, "export", adapter, "-o", tmp_path / "m.onnx"), "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_source_json_kind_must_match_the_file(fault_models, tmp_path, capsys):
    adapter = _adapter_with_source(fault_models, tmp_path, {"path": str(fault_models["pt2"]), "kind": "hf"})
    assert_user_error(cli(capsys, "export", adapter, "-o", tmp_path / "m.onnx"), "'hf'", "'pt2'")


@pytest.mark.parametrize("source,words", [
    ({"path": "/nonexistent/model.pt2", "kind": "pt2"}, ["/nonexistent/model.pt2", "does not exist"]),
    ({"path": "x.pt2", "kind": "pt2", "trust_pickle": True}, ["trust_pickle"]),
    ({"path": "x.pt2", "kind": "exec"}, ["source.json"]),
    ([1, 2], ["source.json", "list"]),
    ("{not json", ["source.json", "not valid JSON"]),
])
def test_source_json_is_validated(source, words, fault_models, tmp_path, capsys):
    adapter = _adapter_with_source(fault_models, tmp_path, source)
    assert_user_error(cli(capsys, "export", adapter, "-o", tmp_path / "m.onnx"), *words)
    assert not (tmp_path / "m.onnx").exists()


def test_hf_directory_with_pickled_weights_needs_trust(fault_models, tmp_path, capsys):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((fault_models["hf"] / "config.json").read_text())
    marker = tmp_path / "marker"
    (model_dir / "pytorch_model.bin").write_bytes(hostile.torch_pickle_payload(marker))
    before = snapshot(model_dir)
    assert_user_error(cli(capsys, "inspect", model_dir), "pytorch_model.bin", "--trust-pickle")
    assert not marker.exists() and snapshot(model_dir) == before


def test_unreadable_pt2_is_one_line(tmp_path, fault_models, capsys):
    garbage = tmp_path / "g.pt2"
    garbage.write_bytes(b"not a zip at all")
    assert_user_error(cli(capsys, "inspect", garbage), "g.pt2")
    truncated = tmp_path / "t.pt2"
    truncated.write_bytes(fault_models["pt2"].read_bytes()[:2000])
    assert_user_error(cli(capsys, "inspect", truncated), "t.pt2")


def test_hf_output_types_load_without_unpickling(tmp_path, capsys):
    """A .pt2 of BertForSequenceClassification returns SequenceClassifierOutput: its pytree
    type is registered by importing transformers' module before the archive is read."""
    import transformers

    from models import VOCAB, _ids
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = _ids()
    torch.export.save(torch.export.export(model, (ids,)), tmp_path / "cls.pt2")
    names = zipfile.ZipFile(tmp_path / "cls.pt2").namelist()
    assert any(n.endswith("models/model.json") for n in names)
    program = load_pt2(tmp_path / "cls.pt2")
    torch.testing.assert_close(program.module()(ids).logits, model(ids).logits)
    assert cli(capsys, "inspect", tmp_path / "cls.pt2").code == 0


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            y = self.proj(x)
        return torch.cond(x.sum() > 0, lambda a: a + 1, lambda a: a - 1, (y,)) * x.shape[0]


def test_checked_reader_accepts_what_torch_export_writes(tmp_path):
    """The checks refuse only what torch.export.save never writes: higher-order ops,
    symbolic shapes (sympy srepr with quoted symbols) and grad-mode regions load."""
    model = _Branchy().eval()
    program = torch.export.export(model, (torch.randn(3, 4),), dynamic_shapes=({0: torch.export.Dim("b", min=2)},))
    torch.export.save(program, tmp_path / "branchy.pt2")
    x = torch.randn(5, 4)
    torch.testing.assert_close(load_pt2(tmp_path / "branchy.pt2").module()(x), model(x))
