"""What a pipeline run leaves in Prefect's UI: a markdown summary, a table of shard stats and
the summary in the run's logs."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core.spec import headline_lines, task_spec
from tokenmill.runtime import services


def run_summary(task: str, manifest: Path, run_id: str, registered, evaluation, init_from: str = "") -> dict:
    """What a pipeline run returns (and `--json` prints): the registered version, its decision,
    the eval set and every eval metric; a classifier's labels; the model it started from."""
    summary = {
        "task": task,
        "manifest": str(manifest),
        "mlflow_run_id": run_id,
        "model_name": registered.name,
        "model_version": registered.version,
        "aliases": registered.aliases,
        "decision": registered.decision,
        "champion_version": registered.champion,
        "eval_set_sha256": evaluation.eval_set_sha256,
        "generations": evaluation.samples,
        **evaluation.metrics,
    }
    if init_from:
        summary["init_from"] = init_from
    if evaluation.model.head:
        summary["labels"] = list(evaluation.model.head["labels"])
    return summary


def mlflow_run_link(run_id: str) -> str:
    """A browser link when MLflow is a server, else where the run lives."""
    uri = services().mlflow_uri
    if uri.startswith(("http://", "https://")):
        from mlflow import MlflowClient

        experiment = MlflowClient().get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"run {run_id} in {uri}"


def metric_rows(summary: dict) -> list[tuple[str, str]]:
    """The headline metrics of the run's task."""
    return headline_lines(task_spec(summary.get("task")), summary, summary.get("labels", ()))


def summary_rows(summary: dict, link: str) -> list[tuple[str, str]]:
    return [
        (
            "model",
            f"{summary['model_name']} v{summary['model_version']} ({', '.join(summary['aliases']) or 'no alias'})",
        ),
        *metric_rows(summary),
        ("eval set", summary["eval_set_sha256"][:16]),
        ("promotion", summary["decision"]),
        ("shards", summary["manifest"]),
        ("MLflow", link),
    ]


def summary_markdown(summary: dict, link: str) -> str:
    code = ("eval set", "shards")
    rows = [(k, f"`{v}`" if k in code else v) for k, v in summary_rows(summary, link)]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# tokenmill run\n\n| | |\n|---|---|\n{table}\n"


def summary_text(summary: dict, link: str) -> str:
    """The summary as plain lines, for the run's logs."""
    return "run summary\n" + "\n".join(f"  {k:<10} {v}" for k, v in summary_rows(summary, link))


def shard_table(manifest_path: Path) -> list[dict]:
    manifest = json.loads(Path(manifest_path).read_text())
    return [
        {
            "shard": s["path"],
            "split": s["split"],
            "rows": s["rows"],
            "tokens": s.get("tokens", ""),
            "sha256": s["sha256"][:16],
        }
        for s in manifest["shards"]
    ]


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary(summary: dict) -> None:
    """The summary as artifacts, and as lines in the run's logs (the terminal prints its own)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tokenmill.console import to_run_log

    link = mlflow_run_link(summary["mlflow_run_id"])
    to_run_log(summary_text(summary, link))
    create_markdown_artifact(
        summary_markdown(summary, link), key="tokenmill-run-summary", description="metrics, model version and lineage"
    )
    create_table_artifact(shard_table(Path(summary["manifest"])), key="tokenmill-shards", description="shard stats")
