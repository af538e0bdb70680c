"""Dropout follows ``train()``/``eval()``.

torch.export bakes the training flag into ``aten.dropout(x, p, train)``. This pass turns
each such call into a ``call_module`` of an ``nn.Dropout(p)`` submodule, which reads
``self.training`` at run time::

    dropout = aten.dropout.default(x, 0.1, False)   ->   dropout = self.rosafx_dropout_0(x)
"""
from __future__ import annotations

import torch
from torch import fx, nn

DROPOUT_TARGETS = (torch.ops.aten.dropout.default,)


def dropout_follows_mode(gm: fx.GraphModule) -> fx.GraphModule:
    for index, node in enumerate([n for n in gm.graph.nodes if n.op == "call_function" and n.target in DROPOUT_TARGETS]):
        name = f"rosafx_dropout_{index}"
        gm.add_submodule(name, nn.Dropout(float(node.args[1])).train(gm.training))
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_module(name, (node.args[0],))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
