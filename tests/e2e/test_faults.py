"""Injected faults: the flow completes, and nothing is lost or duplicated.

MLflow fails its first two calls to open a run, and the registry connection drops right
after a version is created; Prefect's retries recover from both, and the registry still
holds exactly one version for the candidate. A Dask worker killed while it encodes a
partition is replaced, the partition is redone, and the shards match a clean build.
"""

import json
import os
import shutil
import sysconfig
import time
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness


class Flaky:
    """Wraps a method so its first `failures` calls raise a connection error."""

    def __init__(self, method, failures: int, after: bool = False):
        self.method, self.left, self.after, self.calls = method, failures, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        result = self.method(*args, **kwargs) if self.after else None
        if self.left > 0:
            self.left -= 1
            raise ConnectionError("injected: connection reset by peer")
        return result if self.after else self.method(*args, **kwargs)


@pytest.fixture
def small_corpus(tmp_path):
    src = Path(sysconfig.get_paths()["stdlib"])
    dst = tmp_path / "corpus"
    for package in ("json", "email", "logging", "asyncio"):
        shutil.copytree(src / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_flow_recovers_from_flaky_mlflow_without_duplicates(tmp_path, small_corpus, monkeypatch):
    from mlflow import MlflowClient

    import tasks.registry.versions
    import tasks.run.tracking

    state = tmp_path / "state"
    monkeypatch.setenv("TOKENMILL_HOME", str(state))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{state / 'mlflow.db'}")
    for t in (tasks.run.tracking.start_run, tasks.registry.versions.register_candidate):
        monkeypatch.setattr(t, "retry_delay_seconds", [0.2])
    create_run = Flaky(MlflowClient.create_run, failures=2)
    tag_version = Flaky(MlflowClient.set_model_version_tag, failures=1, after=True)
    monkeypatch.setattr(MlflowClient, "create_run", lambda self, *a, **k: create_run(self, *a, **k))
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", lambda self, *a, **k: tag_version(self, *a, **k))

    with prefect_test_harness(server_startup_timeout=180):
        from flows.pipeline import run_pipeline

        summary = run_pipeline(corpus=str(small_corpus), preset="tiny", max_steps=20)

    assert create_run.calls == 3 and tag_version.left == 0
    client = MlflowClient()
    versions = client.search_model_versions("name='tokenmill-lm'")
    assert [str(v.version) for v in versions] == ["1"] and summary["model_version"] == "1"
    runs = client.search_runs([client.get_experiment_by_name("tokenmill").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_a_dask_worker_killed_mid_partition_loses_and_duplicates_nothing(tmp_path):
    import signal
    import threading

    from distributed import Client, LocalCluster

    from data_catalog.loader import resolve_corpus
    from tasks.preprocess.stage import preprocess_corpus
    from tokenmill.config import resolve_config

    corpus = resolve_corpus(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))  # about 4.7 MB
    cfg = resolve_config("tiny", overrides={"data": {"partition_bytes": 600_000, "incremental": False}})
    clean = preprocess_corpus.fn(corpus, cfg.tokenizer, cfg.data, tmp_path / "clean", None, n_workers=1)

    killed: list[str] = []
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):

        def kill_a_worker_mid_partition() -> None:
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                for worker, keys in client.processing().items():
                    if any(str(k).startswith("encode_partition") for k in keys):
                        pid = client.run(os.getpid, workers=[worker])[worker]
                        os.kill(pid, signal.SIGKILL)
                        killed.append(worker)
                        return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_a_worker_mid_partition, daemon=True)
        killer.start()
        faulty = preprocess_corpus.fn(corpus, cfg.tokenizer, cfg.data, tmp_path / "faulty", cluster.scheduler_address)
        killer.join(timeout=5)

    assert killed, "no worker was caught mid-partition"
    clean_manifest, faulty_manifest = (json.loads(Path(p).read_text()) for p in (clean, faulty))
    shas = lambda m: [(s["path"], s["rows"], s["sha256"]) for s in m["shards"]]  # noqa: E731
    assert shas(faulty_manifest) == shas(clean_manifest)
    assert faulty_manifest["stats"]["tokens"] == clean_manifest["stats"]["tokens"]
    assert not list(Path(faulty).parent.glob("*.tmp")) and not list(Path(faulty).parent.glob(".*.tmp"))
