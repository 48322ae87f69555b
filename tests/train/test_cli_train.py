"""`tokenmill train` tracks into one MLflow run only when MLFLOW_TRACKING_URI is set, from rank 0 only."""

import json
import os
import subprocess
import sys

import pytest

from train_helpers import write_corpus

TINY = [
    "--preset",
    "tiny",
    "--set",
    "model.n_layer=2",
    "--set",
    "model.n_head=2",
    "--set",
    "model.n_embd=32",
    "--set",
    "train.log_interval=1",
    "--set",
    "train.device=cpu",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("shards"))


def train(*args: str, home, tracking_uri: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(TOKENMILL_HOME=str(home), MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2", OMP_NUM_THREADS="1")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    out = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "train", *TINY, *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prefect" not in out.stderr.lower()  # tracking needs MLflow only
    return json.loads(out.stdout.strip().splitlines()[-1])


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_a_tracked_run_records_params_every_step_and_system_metrics(shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(
        "--shards",
        str(shards),
        "--max-steps",
        "12",
        "--set",
        "train.batch_size=8",
        home=tmp_path / "state",
        tracking_uri=uri,
    )
    client = mlflow_client(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tokenmill"  # the pipeline's experiment
    assert run.data.params["train.max_steps"] == "12" and run.data.params["model.n_embd"] == "32"
    assert run.data.tags["tokenmill.stages"] == "train" and run.data.tags["tokenmill.shards"] == str(shards)
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, 13))
    assert losses[-1].value == pytest.approx(result["final_loss"])
    assert run.data.metrics["train_tokens"] == result["tokens"]
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_two_ranks_log_into_one_run_without_duplicate_steps(shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(
        "--shards",
        str(shards),
        "--max-steps",
        "4",
        "--set",
        "train.batch_size=4",
        "--nproc-per-node",
        "2",
        home=tmp_path / "state",
        tracking_uri=uri,
    )
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("tokenmill").experiment_id])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    assert [m.step for m in client.get_metric_history(result["mlflow_run_id"], "train_loss")] == [1, 2, 3, 4]


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_without_a_tracking_uri_nothing_is_tracked(shards, tmp_path):
    result = train("--shards", str(shards), "--max-steps", "2", "--set", "train.batch_size=8", home=tmp_path / "state")
    assert result["mlflow_run_id"] is None and result["steps"] == 2
    assert not list(tmp_path.rglob("mlflow.db")) and not list(tmp_path.rglob("mlartifacts"))
