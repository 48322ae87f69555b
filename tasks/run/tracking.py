"""Experiment tracking behind one small interface, with MLflow as the implementation.

A pipeline run is one MLflow run: `start_run` opens it with the resolved config as params,
lineage tags and system metrics, stages log into it by id through `MlflowTracker`, and
`end_run` closes it. The MLflow side lives in `tasks.run.mlflow_runs` (no Prefect there, so
`tokenmill train` can track without it). Nothing here touches the model registry; that is
`tasks/registry/versions.py`.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core.policy import TRACKING_RETRIES
from tasks.run.mlflow_runs import MlflowTracker, close_run, log_data_record, open_run

__all__ = ["MlflowTracker", "close_run", "end_run", "log_data", "open_run", "run_tags", "start_run"]


@task(
    name="start-tracking-run",
    **TRACKING_RETRIES,
    cache_policy=NO_CACHE,
)
def start_run(experiment: str, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> str:
    """Open the pipeline's MLflow run with the resolved config as params; return its id."""
    return open_run(experiment, run_name, config, tags)


@task(
    name="log-data-record",
    **TRACKING_RETRIES,
    cache_policy=NO_CACHE,
)
def log_data(run_id: str, manifest_path: str) -> None:
    """Documents kept and dropped per reason, and the dropped samples, into the pipeline's run."""
    log_data_record(run_id, str(manifest_path))


@task(
    name="end-tracking-run",
    **TRACKING_RETRIES,
    cache_policy=NO_CACHE,
)
def end_run(run_id: str, status: str = "FINISHED") -> None:
    close_run(run_id, status)


def run_tags(
    corpus: str, corpus_fingerprint: str, flow_run_id: str | None, init_from: str = "", task: str = "lm"
) -> dict[str, str]:
    """Lineage tags of a pipeline run; its stages all log into this one MLflow run."""
    return {
        "tokenmill.task": task,
        "tokenmill.init_from": init_from,
        "tokenmill.corpus": corpus,
        "tokenmill.corpus_fingerprint": corpus_fingerprint,
        "tokenmill.stages": "preprocess,train,evaluate,register",
        "prefect.flow_run_id": flow_run_id or "",
    }
