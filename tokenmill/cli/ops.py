"""Unattended operation: `serve` the deployments, emit `corpus-updated`, and `gc` the state dir."""

from __future__ import annotations

import json
import os
import sys

import typer

from tokenmill import runtime
from tokenmill.cli.common import Task, require_labels, user_errors
from tokenmill.credentials import check_servers
from tokenmill.errors import TokenmillError


def corpus_updated(
    corpus: str = typer.Argument(..., help="Catalog name of the corpus that has new data."),
    note: str = typer.Option("", help="Free text carried in the event payload."),
) -> None:
    """Tell the Prefect server that CORPUS has new data (triggers retrain-on-corpus-update)."""
    with user_errors():
        from tasks.run.events import corpus_updated as make_event
        from tasks.run.events import emit

        event = make_event(corpus, note)
        emit(os.environ.get("PREFECT_API_URL"), event)
        typer.echo(f"emitted {event['event']} for {corpus} (event id {event['id']})")


def serve(
    corpus: str = typer.Option("python-stdlib", help="Corpus for the scheduled and triggered runs."),
    preset: str = typer.Option("default", help="Preset for the scheduled and triggered runs."),
    cron: str = typer.Option("0 3 * * *", help="Schedule of nightly-retrain (cron, server time zone)."),
    task: Task | None = typer.Option(None, "--task", help="lm or classify (default: the corpus entry's task)."),
) -> None:
    """Serve the deployments (retrains, promote, weekly gc) from this process against PREFECT_API_URL."""
    with user_errors():
        if not os.environ.get("PREFECT_API_URL"):
            raise TokenmillError("serving needs a Prefect server: start `prefect server start` and set PREFECT_API_URL")
        runtime.configure_env()
        from tasks.run.plan import plan_run

        plan = plan_run(corpus, preset, task=task.value if task else None)
        require_labels(plan)
        check_servers(plan.config.registry.model_name)
        runtime.configure()
        from flows.deployments import serve_all
        from tasks.core.policy import hide_user_error_tracebacks

        hide_user_error_tracebacks()
        serve_all(corpus, preset, cron, task.value if task else None)


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed and its size; remove nothing."),
    keep_last: int = typer.Option(3, "--keep-last", min=0, help="Newest versions of each registered model to keep."),
    min_age: float = typer.Option(
        60, "--min-age", min=0, help="Minutes: never remove anything modified more recently."
    ),
    as_json: bool = typer.Option(False, "--json", help="End stdout with one JSON object of what was removed."),
) -> None:
    """Remove shards, checkpoints, cache records, temp files and training dirs no kept version needs."""
    with user_errors():
        runtime.configure_env()
        from tasks.gc.collect import run_gc
        from tasks.registry.versions import registered_versions

        report = run_gc(runtime.state_dir(), registered_versions(), keep_last, dry_run, min_age * 60)
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
    console.print(
        f"{verb} {report.bytes:,} bytes ({what}); kept {len(report.kept['versions'])} versions", soft_wrap=True
    )
