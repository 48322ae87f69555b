"""The registry commands: `promote`, `rollback`, `models` and `export`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tokenmill import runtime
from tokenmill.cli.common import user_errors
from tokenmill.errors import TokenmillError


def promote(
    version: str = typer.Argument(..., help="Model version to make champion."),
    force: bool = typer.Option(False, "--force", help="Promote even if the gate says no."),
    name: str = typer.Option("tokenmill-lm", help="Registered model name."),
    min_improvement: float = typer.Option(
        0.005,
        help="Relative gain the gate requires in the version's gate metric "
        "(val_bpb for a language model, macro_f1 for a classifier).",
    ),
) -> None:
    """Make VERSION champion if it beats the current one on the same eval set (or --force)."""
    with user_errors():
        runtime.configure_env()
        from tasks.registry.versions import promote as do_promote

        decision = do_promote(name, version, min_improvement, force)
        typer.echo(f"{name} v{version} is champion: {decision.reason}")


def rollback(name: str = typer.Option("tokenmill-lm", help="Registered model name.")) -> None:
    """Move champion back to previous-champion."""
    with user_errors():
        runtime.configure_env()
        from tasks.registry.versions import rollback as do_rollback

        demoted, restored = do_rollback(name)
        typer.echo(f"{name}: champion is v{restored} again (v{demoted} rolled back)")


def models(name: str = typer.Option("tokenmill-lm", help="Registered model name, e.g. tokenmill-classifier.")) -> None:
    """List registered versions with their aliases and key metrics (a classifier's macro_f1 and accuracy)."""
    with user_errors():
        runtime.configure_env()
        from rich.table import Table

        from tasks.registry.versions import list_versions
        from tokenmill.console import console

        columns, rows = list_versions(name)
        table = Table(*columns)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def export(
    model_uri: str = typer.Argument(..., help="A registered language model, e.g. models:/tokenmill-lm@champion."),
    out_dir: Path = typer.Argument(..., help="Directory to write: a new one, or an existing empty one."),
    fmt: str = typer.Option("hf", "--format", help="hf: a Hugging Face checkpoint (safetensors, config, tokenizer)."),
) -> None:
    """Write a registered language model in a format other tools load (transformers' from_pretrained)."""
    with user_errors():
        if fmt != "hf":
            raise TokenmillError(f"unknown --format '{fmt}': the only format is hf (a Hugging Face checkpoint)")
        runtime.configure_env()
        from tasks.registry.export import export_hf

        path = export_hf(model_uri, out_dir)
        arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
        typer.echo(f"wrote {path} ({arch}; load it with AutoModelForCausalLM.from_pretrained)")
