"""The `tokenmill` command line.

    tokenmill run [CORPUS] [--preset NAME] [--max-steps N] [--set SECTION.FIELD=VALUE] [--json]
    tokenmill run CORPUS --task classify [--init-from models:/tokenmill-lm@champion]
    tokenmill models [--name tokenmill-classifier]
    tokenmill export models:/tokenmill-lm@champion OUT_DIR --format hf
    tokenmill gc [--dry-run] [--keep-last N] [--json]   # free disk space no kept version needs
    tokenmill --verbose run ...      # also show Prefect, MLflow and Dask logs (TOKENMILL_VERBOSE=1)

User errors print one line on stderr and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from enum import Enum
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


def show_version(value: bool) -> None:
    if value:
        from tokenmill import __version__

        typer.echo(f"tokenmill {__version__}")
        raise typer.Exit()


@app.callback()
def common(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show the frameworks' logs (Prefect, MLflow, Dask, alembic) on stderr."),
) -> None:
    """Raw text corpora to a trained, evaluated and registered Transformer."""
    if verbose:
        # Before any command configures logging (runtime.configure_env reads it); an environment
        # variable, so the Dask workers and torchrun ranks it starts are verbose too.
        os.environ["TOKENMILL_VERBOSE"] = "1"


class Task(str, Enum):
    lm = "lm"
    classify = "classify"


def require_labels(plan) -> None:
    """A classifier needs a labelled corpus: say which catalog fields make one, before anything is written."""
    if plan.config.task == "classify" and not plan.corpus.entry.labelled:
        raise TokenmillError(
            f"corpus '{plan.corpus.name}' has no labels, so it cannot train a classifier: set label_field "
            f"(JSON Lines or Parquet) or label_dirs: true (one directory per class) in its catalog entry, or use --task lm"
        )


@app.command()
def run(
    corpus: str = typer.Argument("python-stdlib", help="A catalog name, or a file, directory or glob."),
    preset: str = typer.Option("default", help="Named preset: tiny, default, small, medium."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Override train.max_steps."),
    set_: list[str] = typer.Option([], "--set", help="Override any field: SECTION.FIELD=VALUE (repeatable)."),
    catalog: Optional[Path] = typer.Option(None, help="Corpus catalog YAML (default: the bundled one)."),
    as_json: bool = typer.Option(False, "--json", help="End stdout with one JSON object of the result."),
    refresh: bool = typer.Option(False, "--refresh", help="Recompute every stage instead of reusing verified outputs."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from a registered model, e.g. models:/tokenmill-lm@champion."),
    warm_start: bool = typer.Option(False, "--warm-start", help="Start from the current champion when there is one."),
    task: Optional[Task] = typer.Option(None, "--task", help="lm or classify (default: the corpus entry's task)."),
) -> None:
    """Preprocess CORPUS, train, evaluate and register a model: the whole pipeline."""
    with user_errors():
        runtime.configure_env()
        from tokenmill.plan import plan_run

        task_name = task.value if task else None
        require_labels(plan_run(corpus, preset, set_, str(catalog) if catalog else None, max_steps, task_name))  # fail before writing
        runtime.configure()
        runtime.start_embedded_services()  # one process at a time, as overlapping runs share them
        from flows.pipeline import run_pipeline
        from tasks.policy import hide_user_error_tracebacks

        hide_user_error_tracebacks()

        summary = run_pipeline(
            corpus=corpus, preset=preset, overrides=set_, catalog=str(catalog) if catalog else None,
            max_steps=max_steps, refresh=refresh, init_from=init_from, warm_start=warm_start, task=task_name,
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
    if s.get("task") == "classify":
        say(f"  val_loss   {s['val_loss']:.4f} nats/document")
        say(f"  accuracy   {s['accuracy']:.4f}")
        say(f"  macro_f1   {s['macro_f1']:.4f}   ({len(s.get('labels', []))} classes)")
    else:
        say(f"  val_loss   {s['val_loss']:.4f} nats/token   (unigram baseline {s['val_unigram_entropy']:.4f})")
        say(f"  val_ppl    {s['val_ppl']:.2f}")
        say(f"  val_bpb    {s['val_bpb']:.4f} bits/byte")
    say(f"  promotion  {s['decision']}")
    say(f"  champion   {champion_line(s)}")


def champion_line(s: dict) -> str:
    """Which version serves as champion after this run; never an alias that no version holds."""
    name, champion = s["model_name"], s.get("champion_version")
    if champion is None:
        return f"none: no version of {name} has passed the gate yet"
    if str(champion) == str(s["model_version"]):
        return f"models:/{name}@champion (this version)"
    return f"models:/{name}@champion (v{champion}; this version stays challenger)"


@app.command()
def evaluate(
    model_uri: str = typer.Argument(..., help="e.g. models:/tokenmill-lm@champion or models:/tokenmill-lm/3"),
    shards: Optional[Path] = typer.Option(None, help="manifest.json to score on (default: the one it was trained on)."),
    max_rows: Optional[int] = typer.Option(None, min=1, help="Rows of the eval set (default: the eval config's)."),
    as_json: bool = typer.Option(False, "--json", help="End stdout with one JSON object of the metrics."),
) -> None:
    """Score any registered version on any manifest built with its tokenizer."""
    with user_errors():
        runtime.configure_env()
        from tasks.evaluate import evaluate as run_eval
        from tasks.model_store import download_model
        from tasks.registry import recorded_evaluation
        from tokenmill.config import EvalConfig
        from tokenmill.console import console

        try:
            recorded_manifest, recorded_rows = recorded_evaluation(model_uri)
        except TokenmillError:
            if shards is None:
                raise
            recorded_manifest, recorded_rows = str(shards), None
        manifest = shards or recorded_manifest
        if not Path(manifest).is_file():
            raise TokenmillError(f"manifest not found: {manifest}; pass --shards PATH/manifest.json")
        rows = max_rows or recorded_rows
        cfg = EvalConfig(max_rows=rows) if rows else EvalConfig()
        result = run_eval(Path(manifest), download_model(model_uri), cfg)
        out = {"model_uri": model_uri, "manifest": str(manifest), "eval_set_sha256": result.eval_set_sha256,
               **result.metrics, "generations": result.samples}
        headline = ("val_loss", "accuracy", "macro_f1") if getattr(result, "task", "lm") == "classify" else ("val_loss", "val_ppl", "val_bpb")
        for key in headline:
            console.print(f"  {key:<9} {result.metrics[key]:.4f}")
        console.print(f"  eval set  {result.eval_set_sha256[:16]}")
        if as_json:
            sys.stdout.write(json.dumps(out) + "\n")


@app.command()
def promote(
    version: str = typer.Argument(..., help="Model version to make champion."),
    force: bool = typer.Option(False, "--force", help="Promote even if the gate says no."),
    name: str = typer.Option("tokenmill-lm", help="Registered model name."),
    min_improvement: float = typer.Option(0.005, help="Relative gain the gate requires in the version's gate metric "
                                                      "(val_bpb for a language model, macro_f1 for a classifier)."),
) -> None:
    """Make VERSION champion if it beats the current one on the same eval set (or --force)."""
    with user_errors():
        runtime.configure_env()
        from tasks.registry import promote as do_promote

        decision = do_promote(name, version, min_improvement, force)
        typer.echo(f"{name} v{version} is champion: {decision.reason}")


@app.command()
def rollback(name: str = typer.Option("tokenmill-lm", help="Registered model name.")) -> None:
    """Move champion back to previous-champion."""
    with user_errors():
        runtime.configure_env()
        from tasks.registry import rollback as do_rollback

        demoted, restored = do_rollback(name)
        typer.echo(f"{name}: champion is v{restored} again (v{demoted} rolled back)")


@app.command("corpus-updated")
def corpus_updated(
    corpus: str = typer.Argument(..., help="Catalog name of the corpus that has new data."),
    note: str = typer.Option("", help="Free text carried in the event payload."),
) -> None:
    """Tell the Prefect server that CORPUS has new data (triggers retrain-on-corpus-update)."""
    with user_errors():
        import os

        from tasks.events import corpus_updated as make_event, emit

        event = make_event(corpus, note)
        emit(os.environ.get("PREFECT_API_URL"), event, os.environ.get("PREFECT_API_KEY"))
        typer.echo(f"emitted {event['event']} for {corpus} (event id {event['id']})")


@app.command()
def serve(
    corpus: str = typer.Option("python-stdlib", help="Corpus for the scheduled and triggered runs."),
    preset: str = typer.Option("default", help="Preset for the scheduled and triggered runs."),
    cron: str = typer.Option("0 3 * * *", help="Schedule of nightly-retrain (cron, server time zone)."),
    task: Optional[Task] = typer.Option(None, "--task", help="lm or classify (default: the corpus entry's task)."),
) -> None:
    """Serve the deployments (retrains, promote, weekly gc) from this process against PREFECT_API_URL."""
    with user_errors():
        import os

        if not os.environ.get("PREFECT_API_URL"):
            raise TokenmillError("serving needs a Prefect server: start `prefect server start` and set PREFECT_API_URL")
        runtime.configure_env()
        from tokenmill.plan import plan_run

        require_labels(plan_run(corpus, preset, task=task.value if task else None))
        runtime.configure()
        from flows.deployments import serve_all
        from tasks.policy import hide_user_error_tracebacks

        hide_user_error_tracebacks()
        serve_all(corpus, preset, cron, task.value if task else None)


@app.command()
def models(name: str = typer.Option("tokenmill-lm", help="Registered model name, e.g. tokenmill-classifier.")) -> None:
    """List registered versions with their aliases and key metrics (a classifier's macro_f1 and accuracy)."""
    with user_errors():
        runtime.configure_env()
        from rich.table import Table

        from tokenmill.console import console
        from tasks.registry import list_versions

        columns, rows = list_versions(name)
        table = Table(*columns)
        for row in rows:
            table.add_row(*row)
        console.print(table)


@app.command()
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
        from tasks.export import ARCHITECTURE, export_hf

        path = export_hf(model_uri, out_dir)
        typer.echo(f"wrote {path} ({ARCHITECTURE}; load it with AutoModelForCausalLM.from_pretrained)")



@app.command()
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed and its size; remove nothing."),
    keep_last: int = typer.Option(3, "--keep-last", min=0, help="Newest versions of each registered model to keep."),
    min_age: float = typer.Option(60, "--min-age", min=0, help="Minutes: never remove anything modified more recently."),
    as_json: bool = typer.Option(False, "--json", help="End stdout with one JSON object of what was removed."),
) -> None:
    """Remove shards, checkpoints, cache records, temp files and training dirs no kept version needs."""
    with user_errors():
        runtime.configure_env()
        from tasks.gc import run_gc

        report = run_gc(runtime.state_dir(), keep_last, dry_run, min_age * 60)
        print_gc(report)
        if as_json:
            sys.stdout.write(json.dumps(report.as_json()) + "\n")


def print_gc(report) -> None:
    from rich.table import Table

    from tokenmill.console import console

    if report.removed:
        table = Table("bytes", "kind", "path", "why")
        for item in report.removed:
            table.add_row(f"{item['bytes']:,}", item["kind"], item["path"], item["reason"])
        console.print(table)
    for item in report.in_use:
        console.print(f"in use, skipped: {item['path']}", soft_wrap=True)
    verb = "would free" if report.dry_run else "freed"
    what = f"{len(report.removed)} items" if report.removed else "nothing to remove"
    console.print(f"{verb} {report.bytes:,} bytes ({what}); kept {len(report.kept['versions'])} versions", soft_wrap=True)

def _register_stage_commands() -> None:
    from tokenmill.cli_data import catalog_app, preprocess
    from tokenmill.cli_train import train

    app.add_typer(catalog_app, name="catalog")
    app.command("preprocess")(preprocess)
    app.command("train")(train)


_register_stage_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
