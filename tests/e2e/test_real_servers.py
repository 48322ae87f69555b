"""The same code against real servers, on loopback: a Prefect server, an MLflow server, a Dask
scheduler with two workers, and `tokenmill serve`. A `tokenmill.corpus.updated` event must
trigger the retrain deployment, which completes and registers a version in the MLflow server.
Everything is shut down at the end, also when the test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
DEPLOYMENT = "tokenmill-run/retrain-on-corpus-update"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, procs: list) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, proc, log in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited early:\n{Path(log).read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


class Services:
    def __init__(self, root: Path):
        self.root, self.procs = root, []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TOKENMILL_"))}
        self.env.update(
            PREFECT_HOME=str(root / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
            MLFLOW_DISABLE_TELEMETRY="true",
            TOKENMILL_HOME=str(root / "state"),
            TOKENMILL_PROGRESS="0",
        )

    def start(self, name: str, *cmd: str) -> None:
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
        )
        self.procs.append((name, proc, log))

    def stop(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{Path(log).read_text()[-2500:]}" for n, _, log in self.procs)


@pytest.fixture
def services(tmp_path):
    svc = Services(tmp_path)
    yield svc
    svc.stop()


def test_corpus_update_event_triggers_a_served_retrain_that_registers(services):
    prefect_port, mlflow_port, dask_port = free_port(), free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    dask_address = f"tcp://127.0.0.1:{dask_port}"

    services.start(
        "prefect", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)
    )
    services.start(
        "mlflow",
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(mlflow_port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{services.root / 'mlflow.db'}",
        "--artifacts-destination",
        str(services.root / "mlartifacts"),
    )
    services.start(
        "dask-scheduler",
        str(BIN / "dask"),
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(dask_port),
        "--no-dashboard",
    )
    for i in range(2):
        services.start(
            f"dask-worker-{i}", str(BIN / "dask"), "worker", dask_address, "--nthreads", "1", "--no-dashboard"
        )
    wait_http(f"{api}/health", 180, services.procs)
    wait_http(f"{mlflow_uri}/health", 120, services.procs)

    services.env.update(PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_uri, TOKENMILL_DASK_ADDRESS=dask_address)
    services.start("serve", str(BIN / "tokenmill"), "serve", "--preset", "tiny")
    deployment = wait_for(lambda: read_deployment(api), 120, services, "the served deployment")
    wait_for(lambda: automation_for(api, deployment["id"]), 60, services, "the deployment's trigger")
    time.sleep(5)  # let the server's trigger service load the new automation

    emitted = subprocess.run(
        [str(BIN / "tokenmill"), "corpus-updated", "python-stdlib"],
        env=services.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert emitted.returncode == 0, emitted.stderr

    run = wait_for(lambda: finished_run(api, deployment["id"]), 420, services, "the triggered flow run")
    assert run["state_type"] == "COMPLETED", services.logs()
    assert run["parameters"]["corpus"] == "python-stdlib"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    versions = client.search_model_versions("name='tokenmill-lm'")
    assert len(versions) == 1
    assert str(client.get_model_version_by_alias("tokenmill-lm", "champion").version) == "1"
    assert client.get_run(versions[0].run_id).data.tags["prefect.flow_run_id"] == run["id"]


def wait_for(probe, timeout: float, services: Services, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, proc, _ in services.procs:
            if proc.poll() is not None and name != "dask-worker-0":
                raise AssertionError(f"{name} exited while waiting for {what}\n{services.logs()}")
        found = probe()
        if found:
            return found
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}\n{services.logs()}")


def read_deployment(api: str):
    r = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=10)
    return r.json() if r.status_code == 200 else None


def automation_for(api: str, deployment_id: str):
    r = httpx.get(f"{api}/automations/related-to/prefect.deployment.{deployment_id}", timeout=10)
    return r.json() if r.status_code == 200 and r.json() else None


def finished_run(api: str, deployment_id: str):
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    r = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10)
    runs = r.json() if r.status_code == 200 else []
    done = [fr for fr in runs if fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
    return done[0] if done else None
