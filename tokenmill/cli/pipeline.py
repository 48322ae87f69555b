"""`tokenmill run` (the whole pipeline) and `tokenmill evaluate` (score any registered version)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from tasks.core.spec import headline_lines, task_spec
from tokenmill import runtime
from tokenmill.cli.common import Task, require_labels, user_errors
from tokenmill.credentials import check_servers
from tokenmill.errors import TokenmillError


def run(
    corpus: str = typer.Argument("python-stdlib", help="A catalog name, or a file, directory or glob."),
    preset: str = typer.Option("default", help="Named preset: tiny, default, small, medium."),
    max_steps: int | None = typer.Option(None, min=1, help="Override train.max_steps."),
    budget: str | None = typer.Option(
        None, "--budget", help="Train for this long (90s, 10m, 1h): shapes, lr and steps fit the hardware."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override any field: SECTION.FIELD=VALUE (repeatable)."),
    catalog: Path | None = typer.Option(None, help="Corpus catalog YAML (default: the bundled one)."),
    as_json: bool = typer.Option(False, "--json", help="End stdout with one JSON object of the result."),
    refresh: bool = typer.Option(False, "--refresh", help="Recompute every stage instead of reusing verified outputs."),
    init_from: str | None = typer.Option(
        None, "--init-from", help="Start from a registered model, e.g. models:/tokenmill-lm@champion."
    ),
    warm_start: bool = typer.Option(False, "--warm-start", help="Start from the current champion when there is one."),
    task: Task | None = typer.Option(None, "--task", help="lm or classify (default: the corpus entry's task)."),
) -> None:
    """Preprocess CORPUS, train, evaluate and register a model: the whole pipeline."""
    with user_errors():
        runtime.configure_env()
        from tasks.run.plan import plan_run

        if budget is not None:
            from tokenmill.config import parse_duration

            set_ = [*set_, f"train.budget_s={parse_duration(budget)}"]
        task_name = task.value if task else None
        plan = plan_run(corpus, preset, set_, str(catalog) if catalog else None, max_steps, task_name)
        require_labels(plan)  # fail before writing
        check_servers(plan.config.registry.model_name)
        runtime.configure()
        from tokenmill.embedded import start_embedded_services

        api_ready = start_embedded_services()  # safe beside overlapping runs; it starts while we import
        from flows.pipeline import run_pipeline
        from tasks.core.policy import hide_user_error_tracebacks

        hide_user_error_tracebacks()
        api_ready()

        summary = run_pipeline(
            corpus=corpus,
            preset=preset,
            overrides=set_,
            catalog=str(catalog) if catalog else None,
            max_steps=max_steps,
            refresh=refresh,
            init_from=init_from,
            warm_start=warm_start,
            task=task_name,
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
    for name, value in headline_lines(task_spec(s.get("task")), s, s.get("labels", ()), note_sep="   "):
        say(f"  {name:<10} {value}")
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


def evaluate(
    model_uri: str = typer.Argument(..., help="e.g. models:/tokenmill-lm@champion or models:/tokenmill-lm/3"),
    shards: Path | None = typer.Option(None, help="manifest.json to score on (default: the one it was trained on)."),
    max_rows: int | None = typer.Option(None, min=1, help="Rows of the eval set (default: the eval config's)."),
    as_json: bool = typer.Option(False, "--json", help="End stdout with one JSON object of the metrics."),
) -> None:
    """Score any registered version on any manifest built with its tokenizer."""
    with user_errors():
        runtime.configure_env()
        from tasks.evaluate.stage import evaluate as run_eval
        from tasks.registry.model_store import download_model
        from tasks.registry.versions import recorded_evaluation
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
        out = {
            "model_uri": model_uri,
            "manifest": str(manifest),
            "eval_set_sha256": result.eval_set_sha256,
            **result.metrics,
            "generations": result.samples,
        }
        for headline in task_spec(result.task).headline:
            console.print(f"  {headline.metric:<9} {result.metrics[headline.metric]:.4f}")
        console.print(f"  eval set  {result.eval_set_sha256[:16]}")
        if as_json:
            sys.stdout.write(json.dumps(out) + "\n")
