"""The same code against real servers, on loopback: a Prefect server and an MLflow tracking and
registry server, both on PostgreSQL (a fresh database each, dropped afterwards) with MLflow's
artifacts in a directory, and a Dask scheduler with two workers.

- `tokenmill serve`: a `tokenmill.corpus.updated` event triggers the retrain deployment, which
  completes and registers a version in the MLflow server.
- A process work pool and `prefect worker start`: a deployment run by the worker puts its state
  and its registry under the worker's TOKENMILL_HOME, never under the working directory.
- Three overlapping `tokenmill run` on one state dir against the servers: each stage runs
  once, one version is registered, nothing prints a traceback.

Without a PostgreSQL server on 127.0.0.1:5432 the module is skipped, saying so. Everything is
shut down at the end, also when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = "tokenmill-run/retrain-on-corpus-update"
POSTGRES = ("127.0.0.1", 5432)


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

    def start(self, name: str, *cmd: str, env: dict | None = None) -> None:
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(
            cmd,
            env=env or self.env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
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


def postgres_admin(*statements: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(host=POSTGRES[0], port=POSTGRES[1], user="postgres", database="postgres")
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def databases():
    """A fresh PostgreSQL database for Prefect and one for MLflow, dropped afterwards."""
    try:
        socket.create_connection(POSTGRES, timeout=3).close()
    except OSError:
        pytest.skip("no PostgreSQL server answers on 127.0.0.1:5432 (the production-backend test needs one)")
    suffix = uuid.uuid4().hex[:10]
    names = {"prefect": f"tokenmill_test_prefect_{suffix}", "mlflow": f"tokenmill_test_mlflow_{suffix}"}
    postgres_admin(*(f'CREATE DATABASE "{name}"' for name in names.values()))
    yield {key: f"postgres@{POSTGRES[0]}:{POSTGRES[1]}/{name}" for key, name in names.items()}
    postgres_admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names.values()))


@pytest.fixture(scope="module")
def servers(databases, tmp_path_factory):
    """Prefect and MLflow on PostgreSQL, and a Dask cluster, for the module's tests."""
    svc = Services(tmp_path_factory.mktemp("servers"))
    try:
        yield start_servers(svc, databases)
    finally:
        svc.stop()


def start_servers(services: Services, databases: dict) -> Services:
    prefect_port, mlflow_port, dask_port = free_port(), free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    dask_address = f"tcp://127.0.0.1:{dask_port}"

    services.env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://{databases['prefect']}"
    services.start(
        "prefect", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)
    )
    del services.env["PREFECT_API_DATABASE_CONNECTION_URL"]  # the server's own setting, not its clients'
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
        f"postgresql+psycopg2://{databases['mlflow']}",
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
    return services


def test_corpus_update_event_triggers_a_served_retrain_that_registers(servers):
    services = servers
    api, mlflow_uri = services.env["PREFECT_API_URL"], services.env["MLFLOW_TRACKING_URI"]
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


# As a user deploys from Python; Flow.deploy() also asks the server which workers are online,
# the call that fastapi>=0.151 broke for Prefect 3.8 (see pyproject.toml).
DEPLOY = """
import json, sys
from flows.pipeline import run_pipeline

flow = run_pipeline.from_source(source=sys.argv[1], entrypoint="flows/pipeline.py:run_pipeline")
params = json.loads(sys.argv[3])
print(flow.deploy(name="worker-test", work_pool_name=sys.argv[2], parameters=params, build=False, push=False))
"""


def test_a_process_worker_runs_a_deployment_into_its_own_state_dir(servers, tmp_path):
    """The job gets only TOKENMILL_HOME: its shards, models and registry (SQLite, as embedded)
    must land there, wherever the worker and the job happen to run."""
    from preprocess_helpers import python_like_module, write

    services = servers
    api = services.env["PREFECT_API_URL"]
    corpus = tmp_path / "corpus"
    for i in range(20):
        write(corpus / f"mod_{i:02d}.py", python_like_module(random.Random(i), i))
    home = tmp_path / "worker-home"
    env = {k: v for k, v in services.env.items() if not k.startswith(("MLFLOW_", "TOKENMILL_"))}
    env.update(TOKENMILL_HOME=str(home), TOKENMILL_PROGRESS="0")

    def prefect(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    pool = f"tokenmill-test-{uuid.uuid4().hex[:6]}"
    prefect("work-pool", "create", pool, "--type", "process")
    params = {"corpus": str(corpus), "preset": "tiny", "max_steps": 20, "overrides": ["tokenizer.vocab_size=400"]}
    deployed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DEPLOY), str(REPO), pool, json.dumps(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert deployed.returncode == 0, deployed.stderr
    deployment_id = deployed.stdout.strip().splitlines()[-1]

    services.start("worker", str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1", env=env)
    created = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={}, timeout=30)
    assert created.status_code < 300, created.text
    run = wait_for(lambda: finished_run(api, deployment_id), 420, services, "the worker's flow run")
    assert run["state_type"] == "COMPLETED", services.logs()

    from mlflow import MlflowClient

    registry = home / "mlflow.db"
    assert registry.is_file(), f"no registry at {registry}: the job wrote its state elsewhere"
    client = MlflowClient(tracking_uri=f"sqlite:///{registry}", registry_uri=f"sqlite:///{registry}")
    versions = client.search_model_versions("name='tokenmill-lm'")
    assert [client.get_run(v.run_id).data.tags["prefect.flow_run_id"] for v in versions] == [run["id"]]
    assert list((home / "shards").glob("corpus-*/manifest.json")), "the shards are not under TOKENMILL_HOME"
    assert not (REPO / "mlruns").exists() and not (services.root / "mlflow.db").exists()


def test_three_overlapping_runs_against_the_servers_build_and_register_once(servers, tmp_path):
    """A schedule and two triggers at once, on one state dir, against the servers and the Dask cluster."""
    from mlflow import MlflowClient

    src = Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email", "logging", "asyncio"):
        shutil.copytree(src / package, tmp_path / "corpus" / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**servers.env, "TOKENMILL_HOME": str(tmp_path / "state")}
    model = "tokenmill-overlap"
    cmd = [str(BIN / "tokenmill"), "run", str(tmp_path / "corpus"), "--preset", "tiny", "--max-steps", "20",
           "--set", f"registry.model_name={model}"]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        for _ in range(3)
    ]
    errs = [p.communicate(timeout=400)[1] for p in procs]

    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-3000:] for e in errs)
    assert not [e for e in errs if "Traceback" in e], "\n".join(errs)
    for work in ("training bpe tokenizer", "> encoding ", "training on cpu", "evaluating on the frozen eval set"):
        assert sum(work in e for e in errs) == 1, (work, errs)
    uri = servers.env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [str(v.version) for v in client.search_model_versions(f"name='{model}'")] == ["1"]
    assert len(list((tmp_path / "state" / "shards").glob("*/manifest.json"))) == 1
