"""One owner of an adapted model, captured whole (an ``fx.GraphModule``) or in parts (a
``PartlyCaptured`` wrapper, rosafx/pipeline/partial.py): which graphs it has, how it merges,
and whether it is one graph. The API and the file formats ask it and never test the kind
themselves; the record (``adapted_graph.record``) and the adapters (``adapters_of``) read
the same on both kinds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import fx, nn

from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import is_adapted
from rosafx.passes.merge import merge_adapters
from rosafx.pipeline.partial import PartlyCaptured, merge_partly


@dataclass(frozen=True)
class AdaptedModel:
    module: nn.Module
    graphs: list[fx.GraphModule]     # every graph that holds adapter nodes (or may)
    whole: bool                      # one graph: calibrate, lower, to_device, resample and ONNX need it
    why_in_parts: str                # "" when whole
    _merge: Callable[[nn.Module], nn.Module]

    def merged(self) -> nn.Module:
        """Every adapter folded into its weight: a plain graph, or the user's kind of model
        with merged weights when it was captured in parts."""
        return self._merge(self.module)


def adapted_model(model, action: str = "this", *, whole_graph: bool = False) -> AdaptedModel:
    """The owner of ``model`` as rosafx.transform / rosafx.load returned it; a user error
    naming ``action`` for anything else (or for a model in parts where one graph is needed)."""
    if isinstance(model, PartlyCaptured) and is_adapted(model):
        if whole_graph:
            raise RosafxError(f"rosafx.{action} works on a whole-model graph; this model was captured in parts.")
        return AdaptedModel(model, list(model.parts().values()), False, model.python.get("", ""), merge_partly)
    if isinstance(model, fx.GraphModule) and is_adapted(model):
        return AdaptedModel(model, [model], True, "", merge_adapters)
    raise RosafxError(f"rosafx.{action} takes the module returned by rosafx.transform or rosafx.load, "
                      f"got {type(model).__name__}.")
