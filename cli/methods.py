"""rosafx methods: the registered method ids, each with what it is."""
from __future__ import annotations

import typer

from rosafx.methods import FULL, REGISTRY


def methods() -> None:
    """List the adapter methods, each with its registry description."""
    for method_id in sorted(REGISTRY):
        typer.echo(f"{method_id:<12} {REGISTRY[method_id].description}")
    typer.echo(f"{FULL:<12} train a whole module as is (HF PEFT's modules_to_save), e.g. a new task head")
