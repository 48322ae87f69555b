"""Experiment tracking behind one small interface, with MLflow as the implementation.

A pipeline run is one MLflow run: `start_run` opens it with the resolved config as params
and lineage tags, stages log into it by id, and `end_run` closes it. Nothing here touches
the model registry; that is `tasks/registry.py`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

import tokenmill
from tasks.policy import retry_transient
from tokenmill.runtime import services

SECRET_HINTS = ("password", "secret", "token_", "api_key", "credential")


class MlflowTracker:
    """`log_metrics(metrics, step)` into one run, through the client API (thread-safe, no globals)."""

    def __init__(self, run_id: str):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif not any(h in name.lower() for h in SECRET_HINTS):
            out[name] = str(value)[:500]
    return out


def ensure_experiment(name: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=services().artifact_root)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@task(name="start-tracking-run", retries=3, retry_delay_seconds=[1, 4, 10], retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def start_run(experiment: str, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> str:
    """Open the pipeline's MLflow run with the resolved config as params; return its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = MlflowClient()
    all_tags = {"mlflow.runName": run_name, **{k: v for k, v in tags.items() if v}}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    all_tags["tokenmill.version"] = tokenmill.__version__
    run = client.create_run(ensure_experiment(experiment), tags=all_tags)
    client.log_dict(run.info.run_id, config, "config.json")
    params = [Param(k, v) for k, v in flatten(config).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100], synchronous=True)
    return run.info.run_id


@task(name="end-tracking-run", retries=3, retry_delay_seconds=[1, 4, 10], retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def end_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


def run_tags(corpus: str, corpus_fingerprint: str, flow_run_id: str | None, init_from: str = "",
             task: str = "lm") -> dict[str, str]:
    """Lineage tags of a pipeline run; its stages all log into this one MLflow run."""
    return {
        "tokenmill.task": task,
        "tokenmill.init_from": init_from,
        "tokenmill.corpus": corpus,
        "tokenmill.corpus_fingerprint": corpus_fingerprint,
        "tokenmill.stages": "preprocess,train,evaluate,register",
        "prefect.flow_run_id": flow_run_id or "",
    }
