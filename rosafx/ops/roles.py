"""Named argument roles of the adapter ops: passes read a call's arguments by what they are.

Each op declares its roles once, in its spec (``op_spec(roles={"input": "x", ...})``, role ->
argument name, checked against the stub when declared). ``arg(node, "weight")`` reads a
node's argument by role and ``call(spec, values)`` writes a call of ``spec`` from role ->
value, so merge, calibration and sibling fusion need neither argument positions nor the
names of the ops a method emits. Every op a method emits has the ``ADAPTER_CALL`` roles.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from rosafx.errors import RosafxError
from rosafx.ops.spec import SPECS, OpSpec

# role -> what the argument is (the vocabulary every op's ``roles`` is drawn from)
ROLES = {
    "input": "x, what the site's linear map reads",
    "weight": "W, out x in as the op reads it (a W stored in x out passes through aten.t)",
    "bias": "the site's bias, or None",
    "down": "the down-projection: A (r x in), VeRA's shared A, or a list of A's stacked",
    "up": "the up-projection: B (out x r), or VeRA's shared B",
    "scale": "the float the low-rank product is scaled by",
    "down_scale": "VeRA's d: scales the down-projection's r outputs",
    "up_scale": "VeRA's b: scales the up-projection's out outputs",
    "adapter_input": "the adapter's own input (dropout(x)); None means x itself",
    "down_output": "h = x·Aᵀ, computed once for sibling sites (passes/fuse_siblings.py)",
    "in_features": "how many columns of a shared down-projection a site reads",
}
ADAPTER_CALL = ("input", "weight", "bias")  # the roles of every op a method emits


def spec_of(target) -> OpSpec | None:
    """The spec whose implementation (any backend) ``target`` is; None for other targets."""
    return next((spec for spec in SPECS.values() if target in spec.ops.values()), None)


def position(target, role: str) -> int | None:
    """The position of ``role``'s argument in a call of ``target`` (None: no such role)."""
    spec = spec_of(target)
    return spec.roles.get(role) if spec is not None else None


def has_role(node: fx.Node, role: str) -> bool:
    return position(node.target, role) is not None


def arg(node: fx.Node, role: str) -> Any:
    """``node``'s argument in ``role``; an optional argument left out of the call is None."""
    at = position(node.target, role)
    if at is None:
        raise RosafxError(f"The op {node.target} declares no '{role}' argument; give its op_spec "
                          f"roles={{'{role}': <argument name>, ...}} (rosafx/ops/roles.py).")
    return node.args[at] if len(node.args) > at else None


def call(spec: OpSpec, values: dict[str, Any]) -> tuple:
    """The arguments of a call of ``spec`` (reference implementation) from role -> value."""
    by_position = {at: role for role, at in spec.roles.items()}
    missing = [i for i in range(spec.n_args) if i not in by_position]
    if missing:
        raise RosafxError(f"The op {spec.name} has arguments without a role (positions {missing}); "
                          "declare them in its op_spec roles.")
    return tuple(values[by_position[i]] for i in range(spec.n_args))
