"""What every method provides: a config, an adapter module per site, and a registry entry.

A method is one module (``rosafx/methods/<id>.py``) holding:
  * ``Config``: a dataclass of its options (``from_dict`` rejects unknown keys);
  * ``Adapter``: an ``nn.Module`` per site that owns its tensors, emits its graph node
    (``emit``), and gives the dense weight delta for merge (``delta_weight``);
  * a ``Method`` instance registered in ``rosafx/methods/__init__.py``.

Training life cycle. What a method needs while it trains (calibration before the first
step, resampling every K steps, a mask built after a warm-up) belongs to the method, not
to the loop. ``Method.lifecycle(adapters)`` returns a ``Lifecycle`` for the method's
adapters in one model (or ``None``: lora and vera need nothing). ``rosafx.fit`` (and any
other loop: DDP, a ``transformers.Trainer`` callback) asks every method present in the
model for one and calls, in this order:

  * ``before_training(ctx)``: once, before the first optimizer step (also on resume, so it
    must be a no-op when its work is already in the adapters' tensors);
  * ``after_step(ctx)``: after every optimizer step; ``ctx.step`` counts the steps done;
  * ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint must hold beyond the
    adapters' tensors (which are saved anyway) to resume exactly.

``ctx`` is a ``TrainingContext``: the adapted model, the optimizer, the loss, the step,
calibration batches, and ``rebuild_optimizer()``, which a hook calls after it replaced a
Parameter (rosa-robust's mask changes ``sparse_values``' size). A hook that changes an
optimizer's view of a Parameter in place (rosa's resample) clears that Parameter's
``optimizer.state`` itself.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor, fx, nn

from rosafx.errors import RosafxError
from rosafx.graph.sites import Site


MAX_ALPHA = 1e6  # the options table's bound for --alpha, for every source (rules files, -O, the API)


@dataclasses.dataclass
class MethodConfig:
    method: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, raw: dict) -> "MethodConfig":
        raw = {k: v for k, v in raw.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise RosafxError(f"Unknown option(s) {unknown} for method '{cls.method}'. "
                              f"Valid options: {sorted(names)}.")
        config = cls(**{k: _typed(cls.method, k, v, f.type) for f in dataclasses.fields(cls)
                        for k, v in raw.items() if k == f.name})
        config.validate()
        return config

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RosafxError(f"{self.method}: {f.name} must be a finite number, got {value!r}.")
            if f.name in ("rank",) and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise RosafxError(f"{self.method}: rank must be a non-negative integer, got {value!r}.")
            if f.name == "dropout" and not (0.0 <= float(value) < 1.0):
                raise RosafxError(f"{self.method}: dropout must be in [0, 1), got {value!r}.")
            if f.name == "alpha" and not (0.0 <= float(value) <= MAX_ALPHA):  # 1e308 / r overflows the update
                raise RosafxError(f"{self.method}: alpha must be in [0, {MAX_ALPHA:g}], got {value!r}.")


def _typed(method: str, name: str, value: Any, annotation: Any) -> Any:
    """A config value from a flag or a file, checked against the field's type (an int
    where a float is expected is widened; a bool is never a number)."""
    kind = str(annotation).replace("typing.", "")
    optional = kind.startswith("Optional[") or kind.endswith("| None")
    base = kind.removeprefix("Optional[").removesuffix("]").removesuffix(" | None").strip()
    if value is None and optional:
        return value
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}.get(base, True)
    if not ok:
        raise RosafxError(f"{method}: option '{name}' must be {'an' if base == 'int' else 'a'} {base}, "
                          f"got {value!r}.")
    return float(value) if base == "float" else value


class GraphEmitter:
    """The small vocabulary an adapter uses to write its node into the graph."""

    def __init__(self, graph: fx.Graph, prefix: str):
        self.graph, self.prefix = graph, prefix

    def attr(self, name: str) -> fx.Node:
        """A get_attr node for one of the adapter's own tensors."""
        return self.graph.get_attr(f"{self.prefix}.{name}")

    def shared(self, path: str) -> fx.Node:
        """A get_attr node for a tensor shared across adapters (absolute path)."""
        return self.graph.get_attr(path)

    def module(self, name: str, *args: fx.Node) -> fx.Node:
        return self.graph.call_module(f"{self.prefix}.{name}", args)

    def call(self, op: Callable, *args: Any) -> fx.Node:
        return self.graph.call_function(op, tuple(args))


class Adapter(nn.Module):
    """One site's adapter. Subclasses set tensors in ``__init__`` and implement ``emit`` and
    ``delta_weight``. ``base_weight`` (optional buffer, out x in) replaces the site's frozen
    weight when a method changes it (lora-ga's offset, rosa's remainder)."""

    needs_calibration: ClassVar[bool] = False
    bankable: ClassVar[tuple[str, ...]] = ()
    """Trainable tensors that ``rosafx.bank`` may stack with other sites' (passes/bank.py): only
    where the method's life cycle never works on one tensor alone (its optimizer state, a
    replaced Parameter)."""

    def __init__(self, site: Site, config: MethodConfig):
        super().__init__()
        self.site_path = site.path
        self.in_features, self.out_features = site.in_features, site.out_features
        self.config = config

    # graph
    def emit(self, g: GraphEmitter, x: fx.Node, weight: fx.Node, bias: fx.Node | None) -> fx.Node:
        raise NotImplementedError

    def emit_delta(self, g: GraphEmitter) -> fx.Node | None:
        """A node computing ΔW (out x in) from the adapter's tensors, for sites whose adapter
        acts on the weight rather than on a call (MoE expert slices). None: not supported."""
        return None

    # merge
    def delta_weight(self) -> Tensor:
        """Dense ΔW (out x in, fp32) to add to the weight the graph uses."""
        raise NotImplementedError

    def check_ready(self, action: str) -> None:
        """Raise a RosafxError if the adapter cannot yet be trained or merged."""

    # calibration (data-dependent preparation; see rosafx/methods/calibration.py)
    def wants_gradient(self) -> bool:
        return False

    def begin_calibration(self) -> None: ...

    def observe_gradient(self, grad: Tensor) -> None:
        """One batch's gradient of the site's effective weight, out x in, fp32."""

    def end_calibration(self, num_batches: int, base_weight: Tensor) -> Tensor | None:
        """Finish; may return a new frozen base weight (out x in) for the site."""
        return None

    # persistence (see rosafx/pipeline/serialize.py)
    save_base_weight: ClassVar[bool] = False  # True when base_weight cannot be rebuilt from the base model

    def adapter_state(self) -> dict[str, Tensor]:
        """Tensors to save for this site (default: the state dict, less a rebuildable base_weight)."""
        state = self.state_dict()
        if not self.save_base_weight:
            state.pop("base_weight", None)
        return state

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        """Inverse of ``adapter_state`` on a freshly built adapter of the same config. A saved
        ``base_weight`` is installed by the loader before this is called."""
        state = {k: v for k, v in state.items() if k != "base_weight"}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [m for m in missing if m != "base_weight"]
        if missing or unexpected:
            raise RosafxError(f"Saved adapter for '{self.site_path}' does not fit: missing {missing}, "
                              f"unexpected {unexpected}.")

    def trainable_count(self) -> int:
        """Banked tensors (passes/bank.py) train through their group but count here, as their own."""
        return sum(p.numel() for n, p in self.named_parameters() if p.requires_grad or n in self.bankable)


def kaiming_uniform_(tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """nn.Linear's default init (kaiming_uniform with a = √5): bound = 1/√fan_in."""
    bound = 1.0 / math.sqrt(tensor.shape[1]) if tensor.shape[1] else 0.0
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


@dataclasses.dataclass
class TrainingContext:
    """What a training loop hands to life-cycle hooks (see the module docstring)."""
    model: fx.GraphModule
    optimizer: torch.optim.Optimizer | None
    loss_fn: Callable[[nn.Module, Any], Tensor]
    step: int = 0                          # optimizer steps done
    total_steps: int | None = None         # planned optimizer steps, when known
    steps_per_epoch: int | None = None     # when the training batches have a length
    calibration_batches: Callable[[], Iterable] = lambda: ()  # a fresh iterable of a few training batches
    rebuild_optimizer: Callable[[], None] = lambda: None       # after a hook replaced a Parameter


class Lifecycle:
    """One method's training events for its adapters in one model. Every hook is optional."""

    def __init__(self, adapters: list[Adapter]):
        self.adapters = adapters

    def before_training(self, ctx: TrainingContext) -> None: ...

    def after_step(self, ctx: TrainingContext) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def calibrate_pending(adapters: list[Adapter], ctx: TrainingContext) -> bool:
    """Calibrate those of ``adapters`` that still want a gradient; True if any did."""
    pending = [a for a in adapters if a.wants_gradient()]
    if pending:
        from rosafx.methods.calibration import calibrate
        calibrate(ctx.model, ctx.calibration_batches(), ctx.loss_fn, only=pending)
    return bool(pending)


class CalibrateFirst(Lifecycle):
    """Calibrate before the first step (lora-ga). A resumed run is calibrated already."""

    def before_training(self, ctx: TrainingContext) -> None:
        calibrate_pending(self.adapters, ctx)


class Method:
    """Registry entry. ``build`` turns (site, config) pairs into adapters; methods with
    state shared across sites (VeRA's random pair) override it. ``lifecycle`` gives the
    method's training events (None: nothing to do while training). The two flags opt in to
    features that only some adapters can serve; the passes read them, never a list of ids."""

    id: str = ""
    description: str = ""
    Config: type[MethodConfig] = MethodConfig
    Adapter: type[Adapter] = Adapter
    adapts_expert_weights: bool = False   # MoE expert slices: ΔW from its own tensors (``emit_delta``)
    adapts_partly_captured: bool = False  # rosafx/pipeline/partial.py: no state across sites, no graph-wide pass
    # What a user may ask of the method's sites between steps (rosa: "resample"), by name:
    # action(adapters, optimizer) -> None. ``rosafx.act(adapted, name, optimizer)`` is the one entry.
    actions: ClassVar[dict[str, Callable[[list["Adapter"], Any], None]]] = {}
    # HF PEFT's ``peft_type`` that holds this method's adapters exactly (None: PEFT has no such
    # adapter); rosafx/pipeline/peft_format.py converts by that type, both ways.
    peft_type: ClassVar[str | None] = None

    def build(self, gm: fx.GraphModule, pairs: list[tuple[Site, MethodConfig]]) -> list[Adapter]:
        return [self.Adapter(site, config) for site, config in pairs]

    def rank_limit(self, site: Site) -> int:
        """The largest rank this method may have on ``site``, checked before any tensor is
        allocated: a low-rank factor wider than the layer adds nothing."""
        return min(site.in_features, site.out_features)

    def lifecycle(self, adapters: list[Adapter]) -> Lifecycle | None:
        return None
