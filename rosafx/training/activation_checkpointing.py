"""Per-layer activation checkpointing for training: ``fit(..., grad_checkpoint=True)``,
``rosafx train --grad-checkpoint``.

``GradCheckpointed(adapted)`` is the module a training loop calls instead of ``adapted``:
the same inputs, the same outputs and gradients, the same Parameters (it owns none of its
own), with each layer's activations recomputed in the backward (the view that
``passes/checkpoint_layers.py`` builds). ``adapted`` itself is never changed, so parameter
names, state_dict keys, save/load, merge and export are those of the adapted model; save
and evaluate ``adapted``, not the wrapper.

Life cycles keep working: they act on ``adapted`` (calibration runs its own forward on it,
without checkpointing); a Parameter replaced on an adapter module is read live, and a
rewritten graph (``recompile``) or a replaced top-level submodule makes the next call
rebuild the view.
"""
from __future__ import annotations

from torch import fx, nn

from rosafx.errors import RosafxError


DEFAULT_MODE = "full"


class GradCheckpointed(nn.Module):
    """``adapted`` with each layer under activation checkpointing (training only)."""

    def __init__(self, adapted: fx.GraphModule, mode: str = "full"):
        super().__init__()
        if not isinstance(adapted, fx.GraphModule):
            raise RosafxError(f"grad_checkpoint needs one captured graph (an fx.GraphModule), not "
                              f"{type(adapted).__name__}; a partly captured model (graph breaks) is not supported: "
                              "train it without grad_checkpoint.")
        from rosafx.passes.checkpoint_layers import KEPT_OPS
        if mode not in KEPT_OPS:
            raise RosafxError(f"grad_checkpoint must be True or one of {sorted(KEPT_OPS)}, got {mode!r}.")
        self.adapted, self.mode = adapted, mode
        self._view: list = [None, None]  # [key, view]; a list so nn.Module does not register the view
        self.view()  # fail now, not at the first step, when the graph has no layers

    def _key(self) -> tuple:
        adapted = self.adapted
        return (adapted.code, tuple(id(m) for m in adapted.children()),
                tuple(id(t) for t in adapted._parameters.values()), tuple(id(t) for t in adapted._buffers.values()))

    def view(self) -> fx.GraphModule:
        """The current checkpointed view of ``adapted`` (rebuilt when its graph changed)."""
        from rosafx.passes.checkpoint_layers import checkpoint_layers
        key = self._key()
        if self._view[0] != key:
            self._view[:] = [key, checkpoint_layers(self.adapted, self.mode)]
        return self._view[1]

    def forward(self, *args, **kwargs):
        from rosafx.passes.bank import BANK, views
        if BANK not in self.adapted._modules:
            return self.view()(*args, **kwargs)
        with views(self.adapted):  # a banked graph's forward hooks do not run for the view: its views here
            return self.view()(*args, **kwargs)

    def layers(self) -> list[str]:
        """The checkpointed layers' module paths, in call order."""
        from rosafx.passes.checkpoint_layers import PREFIX
        view = self.view()
        return [m.path for name, m in view.named_children() if name.startswith(PREFIX)]


def grad_checkpointed(adapted: fx.GraphModule, mode: str | bool = True) -> GradCheckpointed:
    """``mode``: True (the default, "full"), "full" (recompute every op of a layer) or
    "attention" (keep the fused attention kernels' outputs, recompute the rest)."""
    return GradCheckpointed(adapted, DEFAULT_MODE if mode is True else mode)


__all__ = ["GradCheckpointed", "grad_checkpointed"]
