"""Graph passes, one per file. Each takes an adapted (or merged) ``fx.GraphModule`` and
returns it rewritten (``GraphModule -> GraphModule``), except ``export``, which writes an
ONNX file and returns an ``ExportReport``. Passes read and change the adapted graph only
through rosafx/graph/adapted_graph.py; ``onnx_latency`` and ``decompose`` are export's helpers."""
