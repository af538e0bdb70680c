"""Regenerate docs/architecture.md: the layers, the two pipelines, the adapted graph's
schema, and one small model through every pass with the graph printed by the code itself
before and after each one.

    .venv/bin/python docs/make_walkthrough.py
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

import rosafx
from rosafx.graph.adapted_graph import adapter_nodes, record
from rosafx.graph.capture import capture
from rosafx.passes.fuse_siblings import fuse_siblings
from rosafx.graph.plan import Plan
from rosafx.pipeline.transform import apply, capture_sites

OUT = Path(__file__).with_name("architecture.md")
RULES = {"query": {"method": "lora", "rank": 2, "alpha": 4}, "key": {"method": "lora", "rank": 2, "alpha": 4}}

LAYERS = """\
## Layers

The folders are the layers. Top-level `passes/`, `kernels/` and `cli/` install as
`rosafx.passes`, `rosafx.kernels` and `rosafx.cli`; everything else lives under `rosafx/`.
From the checkout, run Python with `PYTHONSAFEPATH=1` (the Makefile does): with the checkout on
`sys.path`, `kernels/` would shadow the `kernels` package that transformers imports.

```
cli         cli/: one file per command (adapt, train, evaluate, export, generate, inspect, methods), thin
   ^
recipes     rosafx/recipes/: task models from a model directory + data (heads, data/, recipe,
            rule_flags, loading, evaluation, run_model, generation; a decoder's KV-cache ONNX:
            decoder_io, decoder_export, onnx_decoding, prompts, generators), the demo
   ^
face        rosafx/__init__.py: what `import rosafx` gives
   ^
training    rosafx/training/: fit, options (the typed training options), optim, lifecycle, checkpoint,
            runs (RUN directories), activation_checkpointing, distributed, fsdp, hf_trainer, memory
   ^
api         rosafx/api.py: transform, merge, export_onnx, save, load, calibrate, lower, ...
   ^
pipeline    rosafx/pipeline/: transform (rules -> adapted graph), partial (captured in parts), adapted_model,
            serialize (rosafx adapter files), peft_format + peft_experts (HF PEFT files)
   ^
passes      passes/: drop_export_asserts, dropout, insert (+ insert_experts), fuse_siblings, lower, merge,
            decompose, export (+ onnx_latency, onnx_weights, export_quantized), to_device, checkpoint_layers,
            layer_modules, quantize, bank
   ^
core        rosafx/graph/: capture, sites (the site-form table), rules (the one matcher), safe_regex,
            plan, adapted_graph (the schema), adapter_tensors, layers
            rosafx/methods/: the registry, one file per method, calibration, collectives
            rosafx/ops/ (torch.library ops, one spec each, argument roles), kernels/ (Triton)
   ^
foundation  rosafx/errors.py, rosafx/io/: reading (JSON, safetensors), pt2 (a .pt2 without pickle),
            atomic (temporary name + rename), outputs (what a command may overwrite)
```

Where a new thing goes: a pass in `passes/`, a method in `rosafx/methods/` (+ its op in
`rosafx/ops/`, its Triton kernel in `kernels/`; or a method with an op and kernel of its own as
one folder, `rosafx/methods/<id>/`, docs/adding_a_method.md), a file format in `rosafx/pipeline/`, a command
in `cli/` over a recipe in `rosafx/recipes/`.

A module imports only its own layer or the ones below, and the import graph has no cycle;
`tests/test_layering.py` reads every import of the installed package (function-level ones
included) and fails otherwise. Methods sit in the core: their life cycles call
`rosafx.methods.calibration` (core) and their own math (rosa's `resample_adapters`), never a pass.

## Who owns what

* **The site-form table** (`rosafx/graph/sites.py`): every way a graph applies a weight as a linear
  map (`linear`, `addmm`, `matmul`, `mm`, `bmm`, `einsum`, MoE expert weights), with the argument
  positions of x, W and bias, whether W is read in x out, the views W may pass through
  (`WEIGHT_VIEWS`), and how to write a call again (`rebuild`). `ADAPTER_CALL` says how every
  adapter op reads W: out x in.
* **The ops' argument roles** (`rosafx/ops/roles.py`): each op's spec names what its arguments
  are (`input`, `weight`, `bias`, `down`, `up`, `scale`, `adapter_input`, ...); merge,
  calibration and `fuse_siblings` read and write adapter calls by role, never by position, and
  `fuse_siblings` finds what an op fuses into in `rosafx.ops.siblings.FUSIONS`, never by its name.
* **The rules and the plan** (`rosafx/graph/rules.py`, `rosafx/graph/plan.py`): a rule key has one kind
  (type < regex < suffix < exact path); one matcher (`best_match`) serves sites, `full`
  modules, and HF PEFT's `target_modules` and patterns. `Plan.from_rules` turns rules into
  site -> method config plus `full` modules; `to_dict` / `from_dict` store and restore it.
* **The adapted graph** (`rosafx/graph/adapted_graph.py`): where adapters live, how a node names its
  site, the site's weight, reading and replacing it, the fingerprint, every meta key. Each fact
  is kept once (below).
* **The training options** (`rosafx/training/options.py`): each option `rosafx.fit` takes, with
  its type, bounds and default, once; fit checks its settings there, and the recipe's table
  (`rosafx/recipes/options.py`: `rosafx train`'s flags, `--config`, `run.json`) takes those
  entries with its own defaults and adds the recipe's keys.
* **The adapted model** (`rosafx/pipeline/adapted_model.py`): one owner for a model captured
  whole or in parts: its graphs, how it merges, whether it is one graph. The API and the PEFT
  code ask it; `Captured.weight_names` and `Captured.graph` say the same for a capture.

## Two pipelines, one capture each

```
transform = capture -> sites -> Plan.from_rules(rules)  -> apply
load      = capture -> sites -> Plan.from_dict(saved)   -> apply -> install tensors
load_peft = capture -> sites -> plan from the PEFT config -> apply -> install tensors
```

`rosafx.pipeline.transform.capture_sites` is the first two steps (a model that does not export whole is
captured in parts, `rosafx/pipeline/partial.py`, and the same plan applies to the parts);
`rosafx.pipeline.transform.apply` inserts the plan's adapters, makes `full` modules trainable and writes
the graph's record. `rosafx inspect MODEL --method ...` captures once and prints the plan.
"""


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.query(x) + self.key(x))))


def code(gm) -> str:
    body = gm.code.strip().splitlines()
    keep = [line for line in body if line.strip() and "_guards" not in line and "tree_flatten_spec" not in line]
    keep = [re.sub(r"return pytree\.tree_unflatten\(\((\w+),\).*", r"return \1", line) for line in keep]
    keep = [re.sub(r";  [\w ,=]+ = None$", "", line) for line in keep]  # fx's "x = None" frees: noise here
    return "```python\n" + "\n".join(keep) + "\n```\n"


def block(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text}\n```\n"


def main() -> None:
    torch.manual_seed(0)
    model, example = Block().eval(), (torch.randn(2, 3, 8),)
    parts = ["# Architecture\n\nGenerated by `docs/make_walkthrough.py` (the code prints every graph below).\n\n",
             LAYERS]
    raw, _, _ = capture(model, example)
    captured = capture_sites(model, example)
    parts += ["\n## The walkthrough\n\nThe model is `out(Dropout(relu(query(x) + key(x))))`, all `Linear(8, ·)`.\n",
              "\n### 1. capture (`rosafx/graph/capture.py`)\n"
              "`torch.export(strict=False)` with dynamic batch and sequence, re-wrapped as a plain "
              "`fx.GraphModule`, parameters re-bound so the user's model is never touched.\n", code(raw),
              "\n### 2. dropout (`passes/dropout.py`)\nExport bakes the train/eval mode into "
              "`aten.dropout(x, p, False)`; the pass turns it into an `nn.Dropout` call that follows "
              "`train()`/`eval()`.\n", code(captured.module)]
    parts += ["\n### 3. sites (`rosafx/graph/sites.py`)\n", "| path | form | out x in | module type |\n|---|---|---|---|\n"]
    parts += [f"| `{s.path}` | {s.form} | {s.out_features} x {s.in_features} | {s.module_type.split('.')[-1]} |\n"
              for s in captured.sites]
    plan = Plan.from_rules(RULES, captured.sites, captured.modules)
    parts += ["\n### 4. plan (`rosafx/graph/plan.py`)\n", f"Rules `{json.dumps(RULES)}` give the plan (`Plan.to_dict()`):\n",
              block(json.dumps(plan.to_dict(), indent=2), "json")]
    adapted = apply(captured, plan)
    node = adapter_nodes(adapted)[0]
    info = record(adapted)
    shown = {"plan": "Plan(...)  (the adapters' own config objects)", "sites": info["sites"],
             "example_inputs": "(args, kwargs)", "fingerprint": info["fingerprint"][:16] + "..."}
    parts += ["\n### 5. insert (`passes/insert.py`, through `rosafx.pipeline.transform.apply`)\n"
              "Each call of a planned site becomes one call of a registered op (`torch.library`), which "
              "stays a single node under `torch.export` and has a Triton twin for `lower`. Its arguments "
              "are named by role in the op's spec: x (`input`), W out x in (`weight`), `bias`, then the adapter's tensors.\n", code(adapted),
              "The adapted graph's record, `gm.meta[\"rosafx\"]` (one copy of each fact):\n",
              block(json.dumps(shown, indent=2, default=str), "json"),
              "and an adapter node's mark, `node.meta[\"rosafx\"]` (its site, and what merge needs to "
              "write the original call again):\n", block(json.dumps(node.meta["rosafx"], default=str), "json"),
              "Adapters live in `gm.rosafx_adapters`; `adapters_of(gm)` maps site path -> adapter, the only "
              "name a site has outside this module.\n"]
    with tempfile.TemporaryDirectory() as tmp:
        rosafx.save(adapted, Path(tmp) / "adapter")
        saved = json.loads((Path(tmp) / "adapter" / "rosafx.json").read_text())
    saved["fingerprint"] = saved["fingerprint"][:16] + "..."
    parts += ["\n### 6. save and load (`rosafx/pipeline/serialize.py`)\n`rosafx.json` holds the plan, each site's "
              "weight and the fingerprint; `adapter.safetensors` the adapter tensors. `load` rebuilds the "
              "plan with `Plan.from_dict` and applies it to one fresh capture.\n", block(json.dumps(saved, indent=2),
                                                                                         "json")]
    fused = fuse_siblings(rosafx.transform(model, RULES, example_inputs=example))
    parts += ["\n### 7. fuse_siblings (`passes/fuse_siblings.py`)\nSites that read the same input share "
              "one down-projection over their stacked A's; every Parameter stays where it was and each "
              "site keeps its node and mark.\n", code(fused)]
    merged = rosafx.merge(adapted)
    parts += ["\n### 8. merge (`passes/merge.py`)\nW + ΔW in fp32 (finite check); each node goes back to its "
              "own form through the table's `rebuild`: the merged graph has exactly the base graph's "
              "matmuls.\n", code(merged)]
    parts += ["\n### 9. export (`passes/export.py`)\n`torch.onnx.export(..., dynamo=True)` of the merged graph, "
              "written under a temporary name, checked with onnxruntime against torch, then renamed; returns "
              "an `ExportReport`.\n",
              "\n### Passes that change tensors, not the graph's shape\n"
              "* `lower` (`passes/lower.py`) swaps each adapter node's target between the torch op and its "
              "Triton twin; arguments and marks stay.\n"
              "* `to_device` (`passes/to_device.py`) rewrites the devices torch.export baked into the graph "
              "and moves weights, adapters and tensor constants.\n"
              "* `calibrate` (`rosafx/methods/calibration.py`, core) runs lora-ga's and rosa-robust's data-dependent "
              "preparation; a site that gets a new frozen weight reads `rosafx_adapters.<site>.base_weight` "
              "from then on (`adapted_graph.set_base_weight`).\n"
              "* `resample` is rosa's action (`Method.actions`, run by `rosafx.act`): it refactorises the "
              "adapters in place and leaves the graph as it is.\n",
              "* `bank` (`passes/bank.py`, opt-in: `rosafx.bank`) stacks lora's A and B of equal trailing shape into "
              "a few Parameters (`rosafx_bank.group<i>`) that the optimizer sees instead of two tensors per site; "
              "each site tensor stays in its adapter, its storage a slice of its group, and a forward with "
              "gradients reads views of the groups (one `split_with_sizes` per group) through the same "
              "get_attr nodes: the graph is unchanged.\n",
              "* `quantize` (`passes/quantize.py`, `transform(..., quantize=...)`) stores each frozen linear "
              "weight packed (nf4/int4/int8, `rosafx/ops/quantized.py`) in a `QuantizedWeight` under "
              "`rosafx_quantized`; the site's call reads it through a `call_module` that dequantizes per call "
              "(docs/quantization.md). Merge folds adapters into the dequantized weight.\n",
              "* `onnx_weights` + `export_quantized` (`passes/`, `export_onnx(..., weights=...)`) rewrite the "
              "exported fp32 ONNX's linear layers as onnxruntime's `MatMulNBits` (int4/int8) and check the "
              "result against a dequantized reference and the merged torch model (docs/quantized_onnx.md).\n"]
    text = "".join(parts)
    OUT.write_text(re.sub(r"\n{3,}", "\n\n", text))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
