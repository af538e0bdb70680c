"""passes/onnx_latency.py: op histograms, quartiles, and the export report's same-graph verdict."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import rosafx
from rosafx.passes.onnx_latency import LatencyComparison, op_histogram, quartiles

from models import functional_linear


def test_quartiles_match_numpy():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    want = tuple(np.percentile(values, [25, 50, 75]))
    assert quartiles(values) == pytest.approx(want)


def test_verdict_words():
    same = LatencyComparison(10, (1.0, 1.1, 1.2), (0.9, 1.0, 1.3), (0.9, 1.1, 1.2), same_graph=True)
    assert "same graph as the base" in same.describe() and "x1." not in same.describe()
    inside = LatencyComparison(10, (1.0, 1.1, 1.2), (0.9, 1.0, 1.3), (0.95, 1.02, 1.08), same_graph=False)
    assert inside.within_spread and "equal within the measured spread" in inside.describe()
    outside = LatencyComparison(10, (2.0, 2.1, 2.2), (0.9, 1.0, 1.3), (1.9, 2.1, 2.3), same_graph=False)
    assert not outside.within_spread and "outside the measured spread" in outside.describe()


def test_merged_lora_export_is_the_base_graph(tmp_path):
    model, example = functional_linear()
    adapted = rosafx.transform(model, {"proj": {"method": "lora", "rank": 2}, "out": {"method": "lora", "rank": 2}},
                               example_inputs=example)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_()
    report = rosafx.export_onnx(adapted, tmp_path / "m.onnx", latency_repeats=5)
    assert report.same_graph_as_base is True
    assert "same graph as the base" in str(report)
    assert report.latency.runs == 5 and report.latency.ms[0] <= report.latency.ms[1] <= report.latency.ms[2]
    import onnx
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    counts = Counter(n.op_type for n in graph.node)
    for function in onnx.load(str(tmp_path / "m.onnx")).functions:
        counts.update(n.op_type for n in function.node)
    assert op_histogram(tmp_path / "m.onnx") == dict(counts)
    assert report.to_dict()["same_graph_as_base"] is True
