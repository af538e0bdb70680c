"""bank: many small adapter tensors trained as a few stacked Parameters (issue 22); what
``rosafx.transform`` and ``rosafx.load`` return by default (``bank=False`` to opt out).

An optimizer built the PyTorch way, ``torch.optim.AdamW([p for p in model.parameters() if
p.requires_grad])``, runs its single-tensor loop on CPU: about ten dispatched ops and 40 µs
of host time per tensor and step, whatever the tensor's size. With 154 LoRA sites (308
tensors of 1–2 K numbers each, the TinyLlama row of bench/overhead.py) that is 12–13 ms of a
70 ms step, more than all the adapters' forward and backward arithmetic. ``bank_adapters``
stacks the bankable tensors (``Adapter.bankable``: lora's A and B, vera's d and b) of equal trailing shape,
dtype and device along dim 0 into one Parameter per group (``gm.rosafx_bank.lora_A_<i>`` /
``lora_B_<i>``: a filter by name such as ``"lora_" in name`` still finds them; three groups for
Llama's projections), so the optimizer sees three tensors; Adam's update is
elementwise, so the stacked update is the per-tensor one (same values, same step counts)
as long as every banked tensor gets a gradient every step (a site the loss never reaches
gets a zero gradient here, where the per-tensor loop would skip it).

How the graph reads them, with the graph unchanged: each site tensor stays where it was
(``adapter.lora_A``, a Parameter in its adapter), its storage a slice of its group's
Parameter, and ``requires_grad=False`` (the group's Parameter is what trains). While a
forward runs with gradients on, a pre-hook splits each group into views of the group
Parameter (one ``split_with_sizes`` per group, whose backward is one ``cat``) and puts each
view in its adapter's instance ``__dict__``, where attribute lookup finds it before the
module's parameter: the graph's get_attr reads the view, and gradients reach the group.
A forward hook (``always_call``) takes the views out again. Everything else that reads
``adapter.lora_A`` (merge, save in both formats, delta_weight, load's in-place copies) reads
the Parameter, whose storage is the group's: the trained values, no copy. Per-site ``.grad``
stays None: a site's gradient is its slice of the group's ``.grad`` (``site_grad``).

If a site tensor stops aliasing its group (``model.to(...)``/``.double()`` convert each
Parameter on its own; a Parameter replaced or its ``.data`` reassigned), the next forward
stacks the site tensors again into the same group Parameter object (``.data`` replaced, so an
optimizer built before keeps it): the site tensors are the authority.

torch.compile traces the hooks with the forward, ``fullgraph=True`` included, and sees the
views (tests/test_bank.py, float64); the aliasing check reads data pointers and runs in eager
calls only, so a compiled call after a Parameter's ``.data`` was replaced by hand reads the
stale group until an eager forward restacks it (``.to()`` and deepcopy re-alias at once).
``rosafx.fit(compile=True)`` unbanks anyway (its compiled step and capturable AdamW were
built and checked per tensor). Not for: export of a training forward (refused:
``unbank_adapters`` first), FSDP's per-layer sharding (``shard_layers`` unbanks), ``copy.copy``
(GraphModule rebuilds itself from what its graph reads, leaving the groups and the hooks
behind, so the copy's site tensors would not train; ``copy.deepcopy`` is handled), and the methods whose life cycle works on single tensors
(rosa's resample clears each factor's optimizer state, rosa-robust replaces its values,
lora-ga calibrates): their adapters are not bankable and stay as they are.
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn

from rosafx.errors import RosafxError
from rosafx.graph.adapted_graph import adapters_of

BANK = "rosafx_bank"


class AdapterBank(nn.Module):
    """The group Parameters (``lora_A_<i>`` ..., site tensors stacked along dim 0) and, per group, its
    members ``(adapter module, tensor name)`` and their row counts. The members are plain
    attributes (lists), not submodules: deepcopy maps them to the copy's adapters."""

    def __init__(self, groups: list[list[tuple[nn.Module, str]]]):
        super().__init__()
        self.members, self.rows, self.names = [], [], []
        for i, members in enumerate(groups):
            tensors = [adapter._parameters[name] for adapter, name in members]
            # named after what it stacks ("lora_A_0"): a filter by name ("lora_" in name) still finds it
            self.names.append(f"{members[0][1]}_{i}")
            self.register_parameter(self.names[i], nn.Parameter(torch.cat([t.detach() for t in tensors])))
            self.members.append(list(members))
            self.rows.append([t.shape[0] for t in tensors])
            self._alias(i)
            for t in tensors:
                t.requires_grad_(False)

    def group(self, i: int) -> nn.Parameter:
        return self._parameters[self.names[i]]

    def _alias(self, i: int) -> None:
        """Each member's storage becomes its rows of the group Parameter."""
        stacked, offset = self.group(i).data, 0
        for (adapter, name), n in zip(self.members[i], self.rows[i]):
            adapter._parameters[name].data = stacked[offset: offset + n]
            offset += n

    def _aliased(self, i: int) -> bool:
        stacked = self.group(i)
        at, step = stacked.data_ptr(), math.prod(stacked.shape[1:]) * stacked.element_size()
        for (adapter, name), n in zip(self.members[i], self.rows[i]):
            t = adapter._parameters.get(name)
            if t is None or t.data_ptr() != at or t.dtype != stacked.dtype or t.device != stacked.device:
                return False
            at += n * step
        return True

    def restack(self, i: int) -> None:
        """The members' current values stacked into the group again (same Parameter object)."""
        stacked = self.group(i)
        tensors = [adapter._parameters.get(name) for adapter, name in self.members[i]]
        if any(t is None or t.shape[0] != n or t.shape[1:] != stacked.shape[1:]
               for t, n in zip(tensors, self.rows[i])) or len({(t.dtype, t.device) for t in tensors}) != 1:
            raise RosafxError("A banked adapter tensor changed shape, or a group's tensors no longer share a "
                              "dtype and device: call rosafx.unbank, then rosafx.bank again, and build the "
                              "optimizer afterwards.")
        with torch.no_grad():
            stacked.data = torch.cat([t.detach() for t in tensors])
        self._alias(i)
        for t in tensors:
            t.requires_grad_(False)

    def realias(self) -> None:
        """Every group aliased by its members again, now (not at the next forward): a later in-place
        change to a group Parameter (an init, a perturbation) then reaches the sites."""
        for i in range(len(self.members)):
            if not self._aliased(i):
                self.restack(i)

    def _apply(self, fn, recurse=True):
        """``model.to(...)``/``.double()`` convert each Parameter on its own (the members first: the
        bank is registered last), which breaks the aliasing; it is restored at once."""
        out = super()._apply(fn, recurse)
        self.realias()
        return out

    def install(self) -> None:
        """Each member's instance attribute: its view of the group Parameter (this forward's)."""
        for i, (members, rows) in enumerate(zip(self.members, self.rows)):
            if not torch.compiler.is_compiling() and not self._aliased(i):  # data pointers: eager only
                self.restack(i)
            for (adapter, name), view in zip(members, torch.split_with_sizes(self.group(i), rows)):
                adapter.__dict__[name] = view

    def remove(self) -> None:
        for members in self.members:
            for adapter, name in members:
                adapter.__dict__.pop(name, None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Nothing: the site tensors, which alias the groups, are the state (one copy of each
        number, and a state dict that loads into an unbanked model)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Nothing: loading the site tensors (in place) writes the groups."""


class views:
    """``with views(gm):`` the group views in place for a call that runs ``gm``'s adapters
    through another module (GradCheckpointed's per-layer view of the graph), as ``gm``'s own
    forward hooks put them; nothing when ``gm`` is not banked or gradients are off."""

    def __init__(self, gm: nn.Module):
        self.gm = gm

    def __enter__(self):
        _views_in(self.gm, ())

    def __exit__(self, *exc):
        _views_out(self.gm, (), None)


def _views_in(module: nn.Module, args) -> None:
    """Under torch.compile dynamo traces this hook with the forward (``fullgraph=True`` holds) and
    sees the views put in place; the aliasing check (data pointers) runs in eager calls only."""
    bank = module._modules.get(BANK)
    if bank is None or not torch.is_grad_enabled():
        return
    if torch.compiler.is_exporting():
        raise RosafxError("This model's adapters are banked (rosafx.bank, the default of rosafx.transform): "
                          "call rosafx.unbank(model) before exporting a training forward.")
    bank.install()


def _views_out(module: nn.Module, args, output) -> None:
    bank = module._modules.get(BANK)
    if bank is not None:
        bank.remove()


def bank_adapters(gm: fx.GraphModule) -> fx.GraphModule:
    """Stack the trainable bankable adapter tensors (module docstring); in place, returns ``gm``.
    Build the optimizer afterwards. A group of one tensor is left as it is."""
    if not isinstance(gm, fx.GraphModule):
        raise RosafxError("rosafx.bank works on a model captured as one graph.")
    if BANK in gm._modules:
        return gm
    groups: dict[tuple, list[tuple[nn.Module, str]]] = {}
    for adapter in adapters_of(gm).values():
        for name in type(adapter).bankable:
            t = adapter._parameters.get(name)
            if t is not None and t.requires_grad and t.dim() >= 1:
                groups.setdefault((t.dtype, t.device, tuple(t.shape[1:])), []).append((adapter, name))
    groups_kept = [members for members in groups.values() if len(members) > 1]
    if not groups_kept:
        return gm
    gm.add_module(BANK, AdapterBank(groups_kept))
    _hook(gm)
    # GraphModule.__deepcopy__ builds the copy anew and keeps no forward hook: the copy gets its own
    gm._register_deepcopy_hook(_hook)
    return gm


def bank_whole(model: nn.Module) -> nn.Module:
    """``bank_adapters`` on a model captured as one graph; a model captured in parts as it is."""
    return bank_adapters(model) if isinstance(model, fx.GraphModule) else model


def _hook(gm: fx.GraphModule) -> None:
    if BANK in gm._modules:
        gm._modules[BANK].realias()        # a deepcopy clones each Parameter on its own
    if BANK in gm._modules and _views_in not in gm._forward_pre_hooks.values():
        gm.register_forward_pre_hook(_views_in)
        gm.register_forward_hook(_views_out, always_call=True)


def unbank_adapters(gm: fx.GraphModule) -> fx.GraphModule:
    """Undo ``bank_adapters``: each site tensor a trainable Parameter with its own storage
    again, holding the trained values. In place; build the optimizer afterwards."""
    bank = gm._modules.get(BANK)
    if bank is None:
        return gm
    bank.remove()
    for i, members in enumerate(bank.members):
        if not bank._aliased(i):
            bank.restack(i)
        for adapter, name in members:
            t = adapter._parameters[name]
            t.data = t.data.clone()
            t.requires_grad_(True)
    del gm._modules[BANK]
    for hooks, fn in ((gm._forward_pre_hooks, _views_in), (gm._forward_hooks, _views_out)):
        for key in [k for k, hook in hooks.items() if hook is fn]:
            del hooks[key]
            gm._forward_hooks_always_called.pop(key, None)
    if _hook in gm._deepcopy_hooks:
        gm._unregister_deepcopy_hook(_hook)
    return gm


def site_grad(gm: fx.GraphModule, adapter: nn.Module, name: str):
    """The gradient of one adapter tensor: its own ``.grad``, or, banked, its rows of the
    group's ``.grad`` (None before a backward)."""
    bank = gm._modules.get(BANK)
    if bank is not None:
        for i, members in enumerate(bank.members):
            offset = 0
            for (member, member_name), n in zip(members, bank.rows[i]):
                if member is adapter and member_name == name:
                    grad = bank.group(i).grad
                    return None if grad is None else grad[offset: offset + n]
                offset += n
    return adapter._parameters[name].grad
