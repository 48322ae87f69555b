"""MLflow runs without Prefect: open one, log metrics into it, close it.

`open_run` creates a run with the resolved config as params and tags, and starts MLflow's
system-metrics thread on it: CPU, memory, disk, network, and GPU when `pynvml` is installed,
logged as `system/...` every SYSTEM_METRICS_INTERVAL seconds (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
overrides it). `close_run` stops the thread and ends the run. `MlflowTracker` is the Tracker
(`log_metrics(metrics, step)`) that stages hand the training loop.

`tasks.run.tracking` wraps these as the pipeline's Prefect tasks; `tokenmill train` uses
`TrainingRun` directly, so it imports MLflow but not Prefect.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import tokenmill
from tasks.core.provenance import git_commit
from tokenmill.runtime import services

SECRET_HINTS = ("password", "secret", "token_", "api_key", "credential")
SYSTEM_METRICS_INTERVAL = 10.0  # seconds between samples of a run's system/ metrics

_system_monitors: dict[str, Any] = {}  # run id -> the thread sampling its system metrics, while the run is open


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

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i : i + 100], synchronous=True)


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
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=services().artifact_root)
    except MlflowException:  # another process (a second node, a parallel run) created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def open_run(experiment: str, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> str:
    """Create an MLflow run with the resolved config as params and start sampling its system
    metrics; return its id. `close_run` ends both."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

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
    watch_system(run.info.run_id)
    return run.info.run_id


def watch_system(run_id: str) -> None:
    """Sample this machine into the run's `system/` metrics from a daemon thread until `close_run`
    (the thread also stops by itself once it sees the run ended)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL)
    except Exception as exc:  # no psutil, or a machine it cannot read: these metrics are lost, not the run
        logging.getLogger(__name__).warning("no system metrics for MLflow run %s: %s", run_id, exc)
        return
    monitor.start()
    _system_monitors[run_id] = monitor


def log_data_record(run_id: str, manifest_path: str) -> None:
    """What preprocessing kept and dropped, into the run: documents in and out and, per reason
    (exact duplicate, near-duplicate, each quality filter), documents and bytes dropped as
    `data/...` metrics; the manifest's `dropped` record as `data/dropped.json`; and the sampled
    dropped documents (`dropped/<reason>.jsonl` beside the manifest) under `data/dropped/`."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    manifest = json.loads(Path(manifest_path).read_text())
    stats, dropped = manifest["stats"], manifest.get("dropped", {})
    values = {"data/docs_in": stats.get("docs_in", 0), "data/docs_out": stats.get("docs_out", 0)}
    for reason, n in dropped.items():
        values[f"data/dropped_{reason}"], values[f"data/bytes_dropped_{reason}"] = n["docs"], n["bytes"]
    now = int(time.time() * 1000)
    client = MlflowClient()
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()], synchronous=True)
    client.log_dict(run_id, dropped, "data/dropped.json")
    samples = Path(manifest_path).parent / "dropped"
    if samples.is_dir():
        client.log_artifacts(run_id, str(samples), "data/dropped")


def close_run(run_id: str, status: str = "FINISHED") -> None:
    """Stop sampling system metrics (flushing the last ones), then end the run with `status`."""
    from mlflow import MlflowClient

    monitor = _system_monitors.pop(run_id, None)
    if monitor is not None:
        monitor.finish()
    MlflowClient().set_terminated(run_id, status=status)


class TrainingRun:
    """`tokenmill train`'s Tracker: one MLflow run, opened by `open()` or by the first metrics.

    Under torchrun only rank 0's metrics reach the launching process (`tasks.train.launch.follow`),
    so on a multi-node run the node without rank 0 never opens a run, and the ranks themselves
    never import MLflow.
    """

    def __init__(self, experiment: str, run_name: str, config: dict[str, Any], tags: dict[str, str]):
        self.experiment, self.run_name, self.config, self.tags = experiment, run_name, config, tags
        self.run_id: str | None = None
        self._tracker: MlflowTracker | None = None
        ensure_experiment(experiment)  # reach the tracking store now, not after training

    def open(self) -> str:
        if self.run_id is None:
            self.run_id = open_run(self.experiment, self.run_name, self.config, self.tags)
            self._tracker = MlflowTracker(self.run_id)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.open()
        self._tracker.log_metrics(metrics, step)

    def log_params(self, params: dict[str, str]) -> None:
        self.open()
        self._tracker.log_params(params)

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            close_run(self.run_id, status)
