"""The `tokenmill` command line.

    tokenmill run [CORPUS] [--preset NAME] [--max-steps N] [--set SECTION.FIELD=VALUE] [--json]
    tokenmill models

User errors print one line on stderr and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from tokenmill import runtime
from tokenmill.errors import TokenmillError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Raw text corpora to a trained, evaluated and registered Transformer.")


@contextmanager
def user_errors():
    try:
        yield
    except TokenmillError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


@app.command()
def run(
    corpus: str = typer.Argument("python-stdlib", help="A catalog name, or a file, directory or glob."),
    preset: str = typer.Option("default", help="Named preset: tiny, default, small, medium."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Override train.max_steps."),
    set_: list[str] = typer.Option([], "--set", help="Override any field: SECTION.FIELD=VALUE (repeatable)."),
    catalog: Optional[Path] = typer.Option(None, help="Corpus catalog YAML (default: the bundled one)."),
    as_json: bool = typer.Option(False, "--json", help="End stdout with one JSON object of the result."),
) -> None:
    """Preprocess CORPUS, train, evaluate and register a model: the whole pipeline."""
    with user_errors():
        runtime.configure_env()
        from tokenmill.plan import plan_run

        plan_run(corpus, preset, set_, str(catalog) if catalog else None, max_steps)  # fail before writing
        runtime.configure()
        from flows.pipeline import run_pipeline
        from tasks.policy import hide_user_error_tracebacks

        hide_user_error_tracebacks()

        summary = run_pipeline(
            corpus=corpus, preset=preset, overrides=set_, catalog=str(catalog) if catalog else None,
            max_steps=max_steps,
        )
        print_summary(summary)
        if as_json:
            sys.stdout.write(json.dumps(summary, default=str) + "\n")


def print_summary(s: dict) -> None:
    from tokenmill.console import console

    def say(line: str) -> None:
        console.print(line, soft_wrap=True)

    aliases = ", ".join(s["aliases"]) or "none"
    say("")
    say(f"[bold green]done[/]  {s['model_name']} v{s['model_version']} (aliases: {aliases})")
    say(f"  shards     {s['manifest']}")
    say(f"  val_loss   {s['val_loss']:.4f} nats/token   (unigram baseline {s['val_unigram_entropy']:.4f})")
    say(f"  val_ppl    {s['val_ppl']:.2f}")
    say(f"  val_bpb    {s['val_bpb']:.4f} bits/byte")
    say(f"  promotion  {s['decision']}")
    say(f"  champion   models:/{s['model_name']}@champion")


@app.command()
def models(name: str = typer.Option("tokenmill-lm", help="Registered model name.")) -> None:
    """List registered versions with their aliases and key metrics."""
    with user_errors():
        runtime.configure_env()
        from rich.table import Table

        from tokenmill.console import console
        from tasks.registry import list_versions

        table = Table("version", "aliases", "val_bpb", "val_loss", "decision", "created")
        for row in list_versions(name):
            table.add_row(*row)
        console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
