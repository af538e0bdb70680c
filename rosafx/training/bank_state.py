"""Optimizer state in one form whether or not the adapters are banked (passes/bank.py).

A banked model trains a few stacked Parameters (``rosafx_bank.lora_A_0`` ...) where an
unbanked one trains two tensors a site, so the optimizer's ``state_dict`` of the two is
indexed differently. A checkpoint holds the **canonical** form: one entry per adapter tensor,
in the order an unbanked model lists its trainable Parameters, a stacked group's moments cut
into its members' rows. So a checkpoint resumes into either form: a compiled run (which
unbanks) resumes eagerly (banked) and the other way round, and checkpoints written before
banking existed resume as they are. Adam's state is elementwise, so cutting and stacking it
changes no number; a group's step count is its members' (they step together).

Only a one-group optimizer (``param_groups`` of length 1, what ``rosafx.fit`` builds) is
converted; an optimizer with several groups over a banked model keeps its own indexing and
resumes only into the same form (said when it does not).
"""
from __future__ import annotations

import torch
from torch import nn

from rosafx.errors import RosafxError
from rosafx.passes.bank import BANK

FORM = "rosafx_form"      # key in a saved optimizer state: "canonical" or "banked"


def canonical_tensors(model: nn.Module) -> list[tuple[torch.Tensor, int | None, int, int]]:
    """The trainable tensors an unbanked ``model`` would list, in its order, each as
    ``(tensor, group index or None, first row, rows)``."""
    bank = model._modules.get(BANK)
    member_at = {}
    if bank is not None:
        for i, members in enumerate(bank.members):
            offset = 0
            for (adapter, name), rows in zip(members, bank.rows[i]):
                member_at[id(adapter._parameters[name])] = (i, offset, rows)
                offset += rows
    out = []
    for name, param in model.named_parameters():
        if id(param) in member_at:
            out.append((param, *member_at[id(param)]))
        elif param.requires_grad and not name.startswith(BANK + "."):
            out.append((param, None, 0, 0))
    return out


def to_canonical(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """``saved`` (``optimizer.state_dict()``) in the canonical form when ``model`` is banked."""
    bank = model._modules.get(BANK)
    if bank is None:
        return {**saved, FORM: "canonical"}
    if len(optimizer.param_groups) != 1:
        return {**saved, FORM: "banked"}
    index = {id(p): k for k, p in enumerate(optimizer.param_groups[0]["params"])}
    canonical = canonical_tensors(model)
    state = {}
    for j, (tensor, group, start, rows) in enumerate(canonical):
        source = tensor if group is None else bank.group(group)
        entry = saved["state"].get(index.get(id(source)))
        if entry is None:
            continue
        state[j] = entry if group is None else {
            # the step too is a copy: single-tensor Adam adds 1 to each tensor's step in place
            key: (value[start:start + rows].clone() if _moment(value) else _copy(value))
            for key, value in entry.items()}
    group0 = {**saved["param_groups"][0], "params": list(range(len(canonical)))}
    return {"state": state, "param_groups": [group0], FORM: "canonical"}


def from_canonical(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A saved state in the form ``optimizer`` (built over ``model``'s trainable Parameters) loads."""
    form = saved.get(FORM, "canonical")   # checkpoints from before banking: per tensor, unbanked
    saved = {k: v for k, v in saved.items() if k != FORM}
    bank = model._modules.get(BANK)
    banked_now = bank is not None and len(optimizer.param_groups) == 1
    if form == "banked" or not banked_now:
        # loaded as saved, which needs the same indexing: both banked with several groups, or both unbanked
        multi_banked_now = bank is not None and not banked_now
        if (form == "banked") != multi_banked_now:
            def described(banked_multi: bool) -> str:
                return "banked, with several parameter groups" if banked_multi else "one by one (canonical)"
            raise RosafxError("This checkpoint's optimizer state indexes the adapter tensors "
                              f"{described(form == 'banked')}; this model and optimizer index them {described(multi_banked_now)} (banked tensors are "
                              "converted only for a one-group optimizer). Resume the model as it was trained "
                              "(rosafx.bank / rosafx.unbank, or transform(..., bank=...)).")
        return saved
    params = optimizer.param_groups[0]["params"]
    index = {id(p): k for k, p in enumerate(params)}
    canonical = canonical_tensors(model)
    if len(saved["param_groups"]) != 1 or len(saved["param_groups"][0]["params"]) != len(canonical):
        raise RosafxError(f"This checkpoint's optimizer state covers {len(saved['param_groups'][0]['params'])} "
                          f"tensors; this model trains {len(canonical)}: resume with the model the run trained.")
    state, pieces = {}, {}
    for j, (tensor, group, start, rows) in enumerate(canonical):
        entry = saved["state"].get(j)
        if group is None:
            if entry is not None:
                state[index[id(tensor)]] = entry
        else:
            pieces.setdefault(group, []).append(entry)
    for group, entries in pieces.items():
        if all(e is None for e in entries):
            continue
        if any(e is None for e in entries):
            raise RosafxError("This checkpoint holds optimizer state for some of a bank's tensors and not others; "
                              "resume it unbanked (transform(..., bank=False) or rosafx.unbank).")
        stacked = bank.group(group)
        state[index[id(stacked)]] = {
            key: (torch.cat([e[key] for e in entries]) if _moment(value) else _copy(value))
            for key, value in entries[0].items()}
    return {"state": state, "param_groups": [{**saved["param_groups"][0], "params": list(range(len(params)))}]}


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _moment(value) -> bool:
    """A state tensor shaped as its parameter (Adam's moments), not a 0-dim one (the step)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0
