"""Latency of a merged ONNX graph against the base model's, measured so that noise is not
reported as a finding.

Both sessions run in one loop, one short run each per round, the order swapped every round,
so that load on a shared machine hits both alike. The figures are medians with their
spread (25th–75th percentile): of each model's run times, and of the per-round ratio
merged / base. When the two graphs have the same op histogram (op type -> count, every
node of the graph and its functions) they are the same computation, and the report says
so instead of printing a ratio that can only be noise.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass


def op_histogram(path) -> dict[str, int]:
    """op type -> number of nodes, over the main graph and every local function."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(n.op_type for n in model.graph.node)
    for function in model.functions:
        counts.update(n.op_type for n in function.node)
    return dict(sorted(counts.items()))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class LatencyComparison:
    runs: int                                  # timed runs of each model
    ms: tuple[float, float, float]             # merged: p25, median, p75
    base_ms: tuple[float, float, float]        # base: p25, median, p75
    ratio: tuple[float, float, float]          # per-round merged / base: p25, median, p75
    same_graph: bool                           # identical op histograms
    names: tuple[str, str] = ("merged", "base")  # what the two models are, as the report says them

    @property
    def within_spread(self) -> bool:
        """The per-round ratio's interquartile range contains 1."""
        return self.ratio[0] <= 1.0 <= self.ratio[2]

    def describe(self) -> str:
        def fmt(q):
            return f"{q[1]:.2f} ms (p25–p75 {q[0]:.2f}–{q[2]:.2f})"
        ours, base = self.names
        line = (f"  onnxruntime latency, median of {self.runs} interleaved runs each: {ours} {fmt(self.ms)}, "
                f"{base} {fmt(self.base_ms)}")
        if self.same_graph:
            return line + "\n  same graph as the base (identical op histograms): any difference is timing noise"
        verdict = "equal within the measured spread" if self.within_spread else "outside the measured spread"
        return (line + f"\n  {ours} / {base} per round: median x{self.ratio[1]:.3f} "
                       f"(p25–p75 {self.ratio[0]:.3f}–{self.ratio[2]:.3f}), {verdict}")


def _time_one(session, feed) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return (time.perf_counter() - start) * 1e3


def time_one_session(session, feed, runs: int) -> tuple[float, float, float]:
    session.run(None, feed)  # warm-up
    return quartiles([_time_one(session, feed) for _ in range(runs)])


def compare_latency(session, base_session, feed, runs: int, same_graph: bool,
                    names: tuple[str, str] = ("merged", "base")) -> LatencyComparison:
    for s in (session, base_session):  # warm-up
        s.run(None, feed)
    ours, theirs = [], []
    for i in range(runs):
        if i % 2:
            theirs.append(_time_one(base_session, feed))
            ours.append(_time_one(session, feed))
        else:
            ours.append(_time_one(session, feed))
            theirs.append(_time_one(base_session, feed))
    ratios = [a / b for a, b in zip(ours, theirs)]
    return LatencyComparison(runs, quartiles(ours), quartiles(theirs), quartiles(ratios), same_graph, names)
