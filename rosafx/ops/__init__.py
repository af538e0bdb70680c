"""Registered adapter ops (``torch.library``): one node per site in the adapted graph.

``rosafx::lowrank_linear`` routes each call (``rosafx.ops.spec.implement_routed``): small sites
as aten ops, larger ones as the custom op ``rosafx::lowrank_linear_opaque``; the other ops are
custom ops, one opaque node each under torch.export.

Each op is declared once with ``rosafx.ops.spec.op_spec`` (schema from a typed stub whose
docstring holds the gradients, a fake for export, the autograd wiring); its torch
implementation (the reference, any device) plugs in beside it, and ``rosafx.kernels`` plugs
in Triton ones that ``rosafx.lower`` may swap in. An op used by one method only may be
declared in that method's file instead (docs/adding_a_method.md).
"""
from rosafx.ops import lowrank  # noqa: F401  (registers rosafx::lowrank_linear)
from rosafx.ops import sparse  # noqa: F401  (registers rosafx::sparse_lowrank_linear)
from rosafx.ops import vera  # noqa: F401  (registers rosafx::vera_linear, vera_linear_given_h)
from rosafx.ops import siblings  # noqa: F401  (registers the sibling-fusion ops)
