"""rosafx/ops/roles.py: every op's role table against the op's registered torch schema (the
argument a role names has the type the role needs), the declaration check, the fusion table's
coherence, and reading a node's arguments by role."""
import pytest
import torch
from torch import fx

import rosafx.ops  # noqa: F401  (registers every op)
from rosafx.errors import RosafxError
from rosafx.ops import roles
from rosafx.ops.siblings import FUSIONS
from rosafx.ops.spec import REFERENCE, SPECS, op_spec

# role -> the schema types its argument may have (torch's own spelling of the registered op)
ROLE_TYPES = {
    "input": {"Tensor"}, "weight": {"Tensor"}, "bias": {"Optional[Tensor]"}, "down": {"Tensor", "List[Tensor]"},
    "up": {"Tensor"}, "scale": {"float"}, "down_scale": {"Tensor"}, "up_scale": {"Tensor"},
    "adapter_input": {"Optional[Tensor]"}, "down_output": {"Tensor"}, "in_features": {"int"},
}


def test_the_type_table_covers_the_vocabulary():
    assert set(ROLE_TYPES) == set(roles.ROLES)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_roles_name_arguments_of_the_right_type(name):
    spec = SPECS[name]
    arguments = spec.ops[REFERENCE]._schema.arguments
    assert set(spec.roles) <= set(roles.ROLES), f"{name}: roles outside the vocabulary"
    for role, at in spec.roles.items():
        assert str(arguments[at].type) in ROLE_TYPES[role], f"{name}: role {role} -> {arguments[at]}"


def test_every_op_with_a_weight_has_the_adapter_call_roles():
    with_weight = [spec for spec in SPECS.values() if "weight" in spec.roles]
    assert {"lowrank_linear", "sparse_lowrank_linear", "vera_linear"} <= {s.name for s in with_weight}
    for spec in with_weight:
        assert set(roles.ADAPTER_CALL) <= set(spec.roles), spec.name


def test_a_role_naming_no_argument_is_refused_when_declared():
    def stub_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """y = x·Wᵀ"""
    with pytest.raises(ValueError, match=r"roles \{'down': 'A'\} name no argument"):
        op_spec(stub_op, roles={"input": "x", "down": "A"})


@pytest.mark.parametrize("op", sorted(FUSIONS))
def test_a_fusion_can_write_every_argument_of_its_ops(op):
    """The fused site op takes the original op's arguments by role, plus h; the down op every
    argument from the group (input, down, in_features)."""
    fusion, source = FUSIONS[op], SPECS[op]
    assert set(fusion.given_h.roles) - set(source.roles) == {"down_output"}
    assert sorted(fusion.given_h.roles.values()) == list(range(fusion.given_h.n_args))
    assert set(fusion.down.roles) <= {"input", "down", "in_features"}
    assert sorted(fusion.down.roles.values()) == list(range(fusion.down.n_args))


def _node(target, args):
    graph = fx.Graph()
    return graph.call_function(target, tuple(graph.placeholder(a) if a else None for a in args))


def test_arg_reads_by_role_and_a_left_out_optional_is_none():
    node = _node(torch.ops.rosafx.lowrank_linear.default, ["x", "w", None, "a", "b"])
    assert [roles.arg(node, r).name for r in ("input", "weight", "down", "up")] == ["x", "w", "a", "b"]
    assert roles.arg(node, "bias") is None and roles.arg(node, "adapter_input") is None
    with pytest.raises(RosafxError, match="declares no 'down_output' argument"):
        roles.arg(node, "down_output")


def test_call_refuses_an_op_with_arguments_without_roles():
    with pytest.raises(RosafxError, match="arguments without a role"):
        roles.call(SPECS["sparse_lowrank_linear"], {})
