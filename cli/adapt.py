"""rosafx adapt MODEL --method lora [--target P]... [--rank R] [--alpha A] [--rules FILE] [--quantize nf4] -o OUT

Writes OUT as an adapter directory (rosafx.json + adapter.safetensors) plus source.json,
which names the base model so that `rosafx export OUT` can rebuild it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import rosafx
from rosafx.io.atomic import atomic_directory
from rosafx.recipes.loading import identify, open_model
from rosafx.ops.quantized import Quantization
from rosafx.recipes.recipe import quantization
from rosafx.io.outputs import check_output
from rosafx.pipeline.serialize import write_adapter

from rosafx.cli.inspect import print_sites
from rosafx.cli.options import (AlphaOpt, MethodOpt, ModelArg, OptionOpt, OverwriteOpt, QuantizeGroupOpt, QuantizeOpt,
                                RankOpt, RulesOpt, TargetOpt, TrustOpt, build_rules)

EXAMPLES = """
Examples:
  rosafx adapt ./bert --method lora --target query --target value --rank 8 -o bert-lora
  rosafx adapt model.pt2 --method rosa --rank 8 -o rosa-out
  rosafx adapt ./bert --rules rules.json -o out
  rosafx adapt ./bert --method lora --rank 8 --quantize nf4 -o bert-qlora   (the record names the scheme)
"""


def adapt(model: ModelArg, out: Annotated[Path, typer.Option("--out", "-o", help="Output adapter directory")],
          method: MethodOpt = None, target: TargetOpt = None, rank: RankOpt = None, alpha: AlphaOpt = None,
          option: OptionOpt = None, rules: RulesOpt = None, quantize: QuantizeOpt = None,
          quantize_group_size: QuantizeGroupOpt = None, trust_pickle: TrustOpt = False,
          overwrite: OverwriteOpt = False) -> None:
    """Insert adapters into MODEL by rules and write the adapter directory OUT."""
    source = identify(model)
    check_output(out, inputs=[model, rules], overwrite=overwrite)  # before the slow work, and again below
    rule_set = build_rules(method, target, rank, alpha, option, rules)
    quantize = Quantization.parse(quantization(quantize, quantize_group_size))  # checked before the model opens
    module, example_inputs = open_model(source, trust_pickle=trust_pickle)
    adapted = rosafx.transform(module, rule_set, example_inputs=example_inputs, quantize=quantize)
    print_sites(adapted)
    check_output(out, inputs=[model, rules], overwrite=overwrite)
    with atomic_directory(out) as tmp:  # OUT appears whole or not at all
        write_adapter(adapted, tmp)
        (tmp / "source.json").write_text(source.to_json())
    typer.echo(f"wrote {out}")

