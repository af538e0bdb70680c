"""Drop the metadata checks torch.export leaves in a captured graph.

torch.export (2.13) records, for tensors whose dtype or device the trace relied on, a call
that checks them again at run time and returns nothing::

    _assert_tensor_metadata_default = aten._assert_tensor_metadata.default(le_3, dtype=torch.bool, device=cpu, layout=torch.strided)

A captured TinyLlama-shaped Llama holds 96 of them; each is a dispatched op per step (and
in a training step nothing reads its result), so a host-bound step pays for them
(docs/performance.md, issue 22). The checks guard a re-traced program against other inputs;
a captured graph runs eagerly, where every op checks its own inputs. Only these calls go:
a cast or view that changes nothing at capture time stays (under autocast it may not be a
no-op at run time).
"""
from __future__ import annotations

import torch
from torch import fx

EXPORT_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def drop_export_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in EXPORT_ASSERTS]:
        if not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
