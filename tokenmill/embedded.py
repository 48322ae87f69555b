"""The embedded services of a run on one machine: Prefect's API and MLflow's SQLite store,
started so that overlapping runs on one state dir never migrate a database at once.

The API runs as a child process of the run, the uvicorn command Prefect's own ephemeral
server runs, and this process and its children reach it through PREFECT_API_URL. Starting it
takes seconds (the server imports Prefect's API and opens its database), so `tokenmill run`
starts it before it imports the pipeline and waits for it just before the flow starts; on a
2-core machine the two overlap instead of following each other (BENCHMARKS.md, "A rerun on
unchanged inputs"). Call `start_embedded_services` before anything imports Prefect.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive
from tokenmill.runtime import services

# What Prefect's ephemeral server sets for its uvicorn process (prefect.server.api.server).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def start_embedded_services() -> Callable[[], None]:
    """Start Prefect's API (unless PREFECT_API_URL names a server) and make sure MLflow's SQLite
    tables exist; return a function that waits until the API answers.

    Overlapping runs on one state dir share both SQLite databases, and whichever process comes
    first creates and migrates them; two doing it at once collide (a duplicate index, a
    half-applied migration). So until a start has succeeded on this state dir with these
    versions (a marker in PREFECT_HOME says so), starts take turns under a lock and wait for
    the API there; after that the schema is current and each run starts its own API at once.
    """
    svc = services()
    home = Path(os.environ.get("PREFECT_HOME") or svc.state_dir / "prefect")
    setup = f"{version('prefect')} {version('mlflow')} {svc.mlflow_uri}"
    ready = home / f".tokenmill-ready-{hashlib.sha256(setup.encode()).hexdigest()[:12]}"
    embedded = svc.prefect_api_url is None
    if ready.exists():
        return _start_api(home) if embedded else _nothing
    home.mkdir(parents=True, exist_ok=True)  # a PREFECT_HOME that names a new directory
    with exclusive(home, "starting the embedded Prefect API"):
        if embedded:
            _start_api(home)()
        if svc.mlflow_uri.startswith("sqlite:"):
            from mlflow import MlflowClient

            MlflowClient(svc.mlflow_uri).search_experiments(max_results=1)  # creates the tables when new
        ready.touch()
    return _nothing


def _nothing() -> None:
    return None


def _start_api(home: Path) -> Callable[[], None]:
    """Launch the API's process, point PREFECT_API_URL at it, stop it when this process exits;
    return the wait for its health check. Its output goes to `home/server.log`: a server that
    stops while it still flushes logs tracebacks the terminal has no use for."""
    if "prefect.context" in sys.modules:  # its settings are read once: PREFECT_API_URL would come too late
        raise RuntimeError("start_embedded_services must run before Prefect is imported")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = home / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    site = Path(importlib.util.find_spec("prefect").origin).parent.parent
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(site), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, env={**os.environ, **SERVER_ENV}, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = url  # this process and the processes it starts
    # Registered before Prefect is imported, so it runs after Prefect's own exit handlers
    # have flushed the run's last logs and events to this server.
    atexit.register(_stop, proc)
    return lambda: _wait_healthy(proc, url, log_path)


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    why = f"exited with status {proc.returncode}" if proc.poll() is not None else f"no answer within {timeout:.0f} s"
    raise TokenmillError(
        f"the embedded Prefect API did not start ({why}); see {log_path}, "
        f"or set PREFECT_API_URL to a running Prefect server"
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
