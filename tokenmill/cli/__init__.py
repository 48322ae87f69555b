"""The `tokenmill` command line: one module per command group, put together here.

    tokenmill run [CORPUS] [--preset NAME] [--max-steps N] [--set SECTION.FIELD=VALUE] [--json]
    tokenmill run CORPUS --task classify [--init-from models:/tokenmill-lm@champion]
    tokenmill models [--name tokenmill-classifier]
    tokenmill export models:/tokenmill-lm@champion OUT_DIR --format hf
    tokenmill gc [--dry-run] [--keep-last N] [--json]   # free disk space no kept version needs
    tokenmill --verbose run ...      # also show Prefect, MLflow and Dask logs (TOKENMILL_VERBOSE=1)

    pipeline.py   run, evaluate          registry.py   promote, rollback, models, export
    data.py       catalog, preprocess    train.py      train (no Prefect or MLflow needed)
    ops.py        serve, corpus-updated, gc
    common.py     the error handling they share

User errors print one line on stderr and exit with status 2; they never show a traceback.
Each command imports the stages it runs only when it runs, so `tokenmill --help` stays quick.
"""

from __future__ import annotations

import os

import typer

from tokenmill.cli import data, ops, pipeline, registry, train

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Raw text corpora to a trained, evaluated and registered Transformer.",
)


def show_version(value: bool) -> None:
    if value:
        from tokenmill import __version__

        typer.echo(f"tokenmill {__version__}")
        raise typer.Exit()


@app.callback()
def common(
    version: bool = typer.Option(
        False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show the frameworks' logs (Prefect, MLflow, Dask, alembic) on stderr."
    ),
) -> None:
    """Raw text corpora to a trained, evaluated and registered Transformer."""
    if verbose:
        # Before any command configures logging (runtime.configure_env reads it); an environment
        # variable, so the Dask workers and torchrun ranks it starts are verbose too.
        os.environ["TOKENMILL_VERBOSE"] = "1"


app.command()(pipeline.run)
app.command()(pipeline.evaluate)
app.command()(registry.promote)
app.command()(registry.rollback)
app.command("corpus-updated")(ops.corpus_updated)
app.command()(ops.serve)
app.command()(registry.models)
app.command()(registry.export)
app.command()(ops.gc)
app.add_typer(data.catalog_app, name="catalog")
app.command("preprocess")(data.preprocess)
app.command("train")(train.train)


def main() -> None:
    app()
