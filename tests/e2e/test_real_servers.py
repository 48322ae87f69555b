"""The same code against real servers, on loopback, secured as deploy/README.md sets them up: a
Prefect server with basic auth and an MLflow tracking and registry server running its basic-auth
app, both on PostgreSQL (fresh databases, dropped afterwards) with MLflow's artifacts in a
directory, and a Dask scheduler with two workers over TLS. The pipeline runs as a service user;
a read-only user and a release manager (MANAGE on the model) are made by the admin.

- `tokenmill serve`: a `tokenmill.corpus.updated` event triggers the retrain deployment, which
  completes and registers a version in the MLflow server.
- A process work pool and `prefect worker start`: a deployment run by the worker puts its state
  and its registry under the worker's TOKENMILL_HOME, never under the working directory.
- Three overlapping `tokenmill run` on one state dir against the servers: each stage runs
  once, one version is registered, nothing prints a traceback.
- Without credentials both servers answer 401 and tokenmill says so in one line; a read-only
  user cannot register or promote, and `promote --force` needs MANAGE and records who forced.
- No credential appears in any file, log, MLflow param or tag, or Prefect log, artifact or
  parameter that the runs above wrote.

Without a PostgreSQL server on 127.0.0.1:5432 the module is skipped, saying so. Everything is
shut down at the end, also when a test fails.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import uuid
from contextlib import contextmanager
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
        # Every credential of the module, fresh each time, so that the last test can look for them.
        self.passwords = {user: secrets.token_urlsafe(12) for user in ("prefect", "admin", "svc", "reader", "release")}
        self.prefect_auth = ("admin", self.passwords["prefect"])
        self.written = [root]  # everything the tests' runs write lies below these
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
        deadline = time.time() + 8  # a server still draining its connections then is killed
        for _, proc, _ in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

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
    """Fresh PostgreSQL databases for Prefect, MLflow and MLflow's users, dropped afterwards."""
    try:
        socket.create_connection(POSTGRES, timeout=3).close()
    except OSError:
        pytest.skip("no PostgreSQL server answers on 127.0.0.1:5432 (the production-backend test needs one)")
    suffix = uuid.uuid4().hex[:10]
    names = {key: f"tokenmill_test_{key}_{suffix}" for key in ("prefect", "mlflow", "mlflow_auth")}
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
    """The three servers as deploy/README.md starts them, each with its secrets in its own
    environment only; then the admin makes the users and the clients' environment is the
    pipeline's service user's."""
    prefect_port, mlflow_port, dask_port = free_port(), free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    dask_address = f"tls://127.0.0.1:{dask_port}"
    root, pw = services.root, services.passwords

    services.start(
        "prefect",
        str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port),
        env={**services.env, "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{databases['prefect']}",
             "PREFECT_SERVER_API_AUTH_STRING": ":".join(services.prefect_auth)},
    )  # fmt: skip
    (root / "mlflow-auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\nadmin_username = admin\n"
        f"database_uri = postgresql+psycopg2://{databases['mlflow_auth']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    services.start(
        "mlflow",
        str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(mlflow_port),
        "--workers", "1", "--backend-store-uri", f"postgresql+psycopg2://{databases['mlflow']}",
        "--artifacts-destination", str(root / "mlartifacts"),
        env={**services.env, "MLFLOW_AUTH_CONFIG_PATH": str(root / "mlflow-auth.ini"),
             "MLFLOW_AUTH_ADMIN_PASSWORD": pw["admin"], "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)},
    )  # fmt: skip
    tls = services.tls = DaskTLS(root / "certs")
    services.start(
        "dask-scheduler",
        str(BIN / "dask"), "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", str(dask_port),
        "--no-dashboard", *tls.flags,
    )  # fmt: skip
    for i in range(2):
        services.start(
            f"dask-worker-{i}",
            str(BIN / "dask"), "worker", dask_address, "--nthreads", "1", "--no-dashboard", *tls.flags,
        )  # fmt: skip
    wait_http(f"{api}/health", 180, services.procs)
    wait_http(f"{mlflow_uri}/health", 120, services.procs)

    make_users(mlflow_uri, pw)
    services.env.update(
        PREFECT_API_URL=api,
        PREFECT_API_AUTH_STRING=":".join(services.prefect_auth),
        MLFLOW_TRACKING_URI=mlflow_uri,
        MLFLOW_TRACKING_USERNAME="svc",
        MLFLOW_TRACKING_PASSWORD=pw["svc"],
        TOKENMILL_DASK_ADDRESS=dask_address,
        **tls.client_env,
    )
    return services


class DaskTLS:
    """A CA and a certificate it signed (distributed's Security.temporary()), written to files:
    the scheduler, the workers and tokenmill each name them as their own."""

    def __init__(self, directory: Path):
        from distributed import Security

        from tokenmill.runtime import DASK_TLS_VARS

        certs = Security.temporary()
        directory.mkdir()
        files = {}
        for name, pem in (("ca", certs.tls_ca_file), ("cert", certs.tls_client_cert), ("key", certs.tls_client_key)):
            files[name] = directory / f"{name}.pem"
            files[name].write_text(pem)
        self.key_pem = certs.tls_client_key
        paths = [str(files[name]) for name in ("ca", "cert", "key")]
        self.flags = [flag for pair in zip(("--tls-ca-file", "--tls-cert", "--tls-key"), paths) for flag in pair]
        self.client_env = dict(zip(DASK_TLS_VARS, paths))


def make_users(uri: str, pw: dict) -> None:
    """As the admin: the pipeline's service user, a read-only user (the server's default
    permission is READ) and a release manager who will hold MANAGE on the registered models."""
    for user in ("svc", "reader", "release"):
        r = httpx.post(f"{uri}/api/2.0/mlflow/users/create", json={"username": user, "password": pw[user]},
                       auth=("admin", pw["admin"]), timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text


@contextmanager
def mlflow_as(services: Services, user: str):
    """An MlflowClient of the servers' MLflow, signed in as `user` while the block runs."""
    from mlflow import MlflowClient

    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(zip(names, (user, services.passwords[user])))
    try:
        uri = services.env["MLFLOW_TRACKING_URI"]
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def grant(uri: str, pw: dict, user: str, model: str, permission: str) -> None:
    body = {"username": user, "resource_type": "registered_model", "resource_id": model, "permission": permission}
    r = httpx.post(f"{uri}/api/3.0/mlflow/users/permissions/grant", json=body, auth=("admin", pw["admin"]), timeout=30)
    assert r.status_code == 200, r.text


def test_corpus_update_event_triggers_a_served_retrain_that_registers(servers):
    services = servers
    api = services.env["PREFECT_API_URL"]
    services.start("serve", str(BIN / "tokenmill"), "serve", "--preset", "tiny")
    auth = services.prefect_auth
    deployment = wait_for(lambda: read_deployment(api, auth), 120, services, "the served deployment")
    wait_for(lambda: automation_for(api, auth, deployment["id"]), 60, services, "the deployment's trigger")
    time.sleep(5)  # let the server's trigger service load the new automation

    emitted = subprocess.run(
        [str(BIN / "tokenmill"), "corpus-updated", "python-stdlib"],
        env=services.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert emitted.returncode == 0, emitted.stderr

    run = wait_for(lambda: finished_run(api, auth, deployment["id"]), 420, services, "the triggered flow run")
    assert run["state_type"] == "COMPLETED", services.logs()
    assert run["parameters"]["corpus"] == "python-stdlib"

    with mlflow_as(services, "reader") as client:  # what a reader may see, it sees
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


def read_deployment(api: str, auth: tuple):
    r = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", auth=auth, timeout=10)
    return r.json() if r.status_code == 200 else None


def automation_for(api: str, auth: tuple, deployment_id: str):
    r = httpx.get(f"{api}/automations/related-to/prefect.deployment.{deployment_id}", auth=auth, timeout=10)
    return r.json() if r.status_code == 200 and r.json() else None


def finished_run(api: str, auth: tuple, deployment_id: str):
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    r = httpx.post(f"{api}/flow_runs/filter", json=body, auth=auth, timeout=10)
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
    services.written.append(tmp_path)
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
    auth = services.prefect_auth
    created = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={}, auth=auth, timeout=30)
    assert created.status_code < 300, created.text
    run = wait_for(lambda: finished_run(api, auth, deployment_id), 420, services, "the worker's flow run")
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
    servers.written.append(tmp_path)
    src = Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email", "logging", "asyncio"):
        shutil.copytree(src / package, tmp_path / "corpus" / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**servers.env, "TOKENMILL_HOME": str(tmp_path / "state")}
    model = "tokenmill-overlap"
    cmd = [str(BIN / "tokenmill"), "run", str(tmp_path / "corpus"), "--preset", "tiny", "--max-steps", "20",
           "--set", f"registry.model_name={model}", "--json"]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        for _ in range(3)
    ]
    outs, errs = zip(*(p.communicate(timeout=400) for p in procs))
    for i, (out, err) in enumerate(zip(outs, errs)):
        (tmp_path / f"run-{i}.log").write_text(out + err)  # for the search for secrets at the end

    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-3000:] for e in errs)
    assert not [e for e in errs if "Traceback" in e], "\n".join(errs)
    for work in ("training bpe tokenizer", "> encoding ", "training on cpu", "evaluating on the frozen eval set"):
        assert sum(work in e for e in errs) == 1, (work, errs)
    with mlflow_as(servers, "svc") as client:
        assert [str(v.version) for v in client.search_model_versions(f"name='{model}'")] == ["1"]
    assert len(list((tmp_path / "state" / "shards").glob("*/manifest.json"))) == 1


def tokenmill(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tokenmill"), *args], env=env, capture_output=True, text=True, timeout=180)


def test_without_credentials_both_servers_refuse_and_tokenmill_says_so_in_one_line(servers, tmp_path):
    api, uri = servers.env["PREFECT_API_URL"], servers.env["MLFLOW_TRACKING_URI"]
    assert httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).status_code == 401
    assert httpx.get(f"{uri}/api/2.0/mlflow/registered-models/search", timeout=10).status_code == 401
    assert events_socket_refuses_without_token(api)

    env = {**servers.env, "TOKENMILL_HOME": str(tmp_path / "state")}
    no_prefect = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
    no_mlflow = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_") or k.endswith("URI")}
    wrong = {**env, "PREFECT_API_AUTH_STRING": "admin:wrong", "MLFLOW_TRACKING_PASSWORD": "wrong"}
    cases = [
        (no_prefect, ["corpus-updated", "python-stdlib"], "Prefect", "PREFECT_API_AUTH_STRING"),
        (wrong, ["corpus-updated", "python-stdlib"], "Prefect", "PREFECT_API_AUTH_STRING"),
        (no_prefect, ["run", "python-stdlib", "--preset", "tiny"], "Prefect", "PREFECT_API_AUTH_STRING"),
        (no_mlflow, ["run", "python-stdlib", "--preset", "tiny"], "MLflow", "MLFLOW_TRACKING_USERNAME"),
        (wrong, ["models"], "MLflow", "MLFLOW_TRACKING_PASSWORD"),
    ]
    for case_env, args, server, variable in cases:
        done = tokenmill(case_env, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (args, done.stderr)
        assert lines[0].startswith(f"error: the {server} server at ") and "(401)" in lines[0], lines[0]
        assert variable in lines[0], lines[0]
    assert not (tmp_path / "state").exists(), "a refused run wrote to its state dir"


def events_socket_refuses_without_token(api: str) -> bool:
    """Prefect's event stream, the channel some 3.x releases left open under the auth string."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    async def attempt() -> bool:
        try:
            async with connect(api.replace("http", "ws", 1) + "/events/out", subprotocols=["prefect"]) as ws:
                await ws.send(json.dumps({"type": "auth", "token": None}))
                await asyncio.wait_for(ws.recv(), 10)
        except (ConnectionClosed, InvalidStatus):
            return True
        return False

    return asyncio.run(attempt())


def test_a_reader_cannot_register_or_promote_and_forcing_needs_manage(servers):
    model, pw = "tokenmill-access", servers.passwords
    with mlflow_as(servers, "svc") as client:  # the pipeline's user: it made the model, so it owns it
        client.create_registered_model(model)
        run = client.create_run(client.create_experiment(f"access-{uuid.uuid4().hex[:6]}"))
        source = f"runs:/{run.info.run_id}/model"
        for val_bpb in ("1.5", "1.4"):
            tags = {"gate_metric": "val_bpb", "val_bpb": val_bpb, "eval_set_sha256": "e" * 64}
            client.create_model_version(model, source, run_id=run.info.run_id, tags=tags)
        client.set_registered_model_alias(model, "champion", "1")
    grant(servers.env["MLFLOW_TRACKING_URI"], pw, "release", model, "MANAGE")

    def as_user(user: str, *args: str) -> subprocess.CompletedProcess:
        env = {**servers.env, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": pw[user]}
        return tokenmill(env, *args, "--name", model)

    listed = as_user("reader", "models")
    assert listed.returncode == 0 and "1.4000" in listed.stdout + listed.stderr, listed.stderr
    for args, needs in ((["promote", "2"], "EDIT"), (["promote", "2", "--force"], "MANAGE")):
        refused = as_user("reader", *args)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "reader may not" in refused.stderr and f"needs {needs}" in refused.stderr, refused.stderr
    from mlflow.exceptions import MlflowException

    with mlflow_as(servers, "reader") as client:  # the server refuses it whatever the client
        for write in (
            lambda: client.set_registered_model_alias(model, "champion", "2"),
            lambda: client.create_model_version(model, source, run_id=run.info.run_id),
        ):
            with pytest.raises(MlflowException) as refused:
                write()
            assert refused.value.get_http_status_code() == 403

    forced = as_user("release", "promote", "2", "--force")
    assert forced.returncode == 0 and "forced by release over champion v1" in forced.stdout, forced.stderr
    with mlflow_as(servers, "reader") as client:
        assert str(client.get_model_version_by_alias(model, "champion").version) == "2"
        assert client.get_model_version(model, "2").tags["promotion.forced_by"] == "release"


def test_no_credential_reaches_anything_the_runs_wrote(servers):
    """Files (state dirs, artifacts, the servers' and runs' logs, --json output), MLflow's params
    and tags, and Prefect's flow-run parameters, logs and artifacts: none holds a secret."""
    pw = servers.passwords
    wanted = [*pw.values(), servers.tls.key_pem.splitlines()[1]]
    logins = [("admin", pw["prefect"]), *((user, pw[user]) for user in ("admin", "svc", "reader", "release"))]
    wanted += [base64.b64encode(f"{user}:{password}".encode()).decode() for user, password in logins]
    leaks = []
    for root in servers.written:
        for path in root.rglob("*"):
            if path.is_file() and servers.root / "certs" not in path.parents:
                data = path.read_bytes()
                leaks += [f"{path}: {secret[:4]}..." for secret in wanted if secret.encode() in data]

    with mlflow_as(servers, "admin") as client:
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id], max_results=1000):
                record = json.dumps([run.data.params, run.data.tags])
                leaks += [f"run {run.info.run_id}" for secret in wanted if secret in record]
        for mv in client.search_model_versions(max_results=1000):
            leaks += [f"{mv.name} v{mv.version}" for secret in wanted if secret in json.dumps(mv.tags)]
    api, auth = servers.env["PREFECT_API_URL"], servers.prefect_auth
    for what in ("flow_runs", "task_runs", "logs", "artifacts"):
        offset = 0
        while page := httpx.post(f"{api}/{what}/filter", json={"limit": 200, "offset": offset}, auth=auth,
                                 timeout=30).json():  # fmt: skip
            leaks += [f"prefect {what}" for secret in wanted if secret in json.dumps(page)]
            offset += len(page)
        assert what != "logs" or offset, "no Prefect logs were read"
    assert not leaks, leaks
