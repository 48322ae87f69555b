"""The embedded services of a run on one machine: Prefect's ephemeral API and MLflow's SQLite
store, started so that overlapping runs on one state dir never migrate a database at once.
"""

from __future__ import annotations

import hashlib
import os
from importlib.metadata import version
from pathlib import Path

from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive
from tokenmill.runtime import Services, services


def start_embedded_services() -> None:
    """Start Prefect's embedded API and create MLflow's SQLite tables, safely beside other runs.

    Overlapping runs on one state dir share both SQLite databases, and whichever process comes
    first creates and migrates them; two doing it at once collide (a duplicate index, a
    half-applied migration). So until a start has succeeded on this state dir with these
    versions (a marker in PREFECT_HOME says so), starts take turns under a lock; after that
    the schema is current and each run starts its own API at once. Real servers are left alone.
    """
    svc = services()
    home = Path(os.environ.get("PREFECT_HOME") or svc.state_dir / "prefect")
    setup = f"{version('prefect')} {version('mlflow')} {svc.mlflow_uri}"
    ready = home / f".tokenmill-ready-{hashlib.sha256(setup.encode()).hexdigest()[:12]}"
    if ready.exists():
        _start_services(svc, home)
        return
    with exclusive(home, "starting the embedded Prefect API"):
        _start_services(svc, home)
        ready.touch()


def _start_prefect_api(log: Path) -> None:
    """Start the embedded API with its output appended to `log`: a server that stops while it
    still flushes (the run is over, other runs hold the database) logs tracebacks the
    terminal has no use for. The flow's client then finds this instance and uses it."""
    from prefect.server.api.server import SubprocessASGIServer

    class LoggedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            log.parent.mkdir(parents=True, exist_ok=True)
            saved = os.dup(1), os.dup(2)
            with open(log, "ab") as out:  # the server inherits stdout and stderr as they are now
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                try:
                    return super()._run_uvicorn_command()
                finally:
                    for fd, copy in zip((1, 2), saved):
                        os.dup2(copy, fd)
                        os.close(copy)

    LoggedServer().start()


def _start_services(svc: Services, home: Path) -> None:
    if svc.prefect_api_url is None:
        log = home / "server.log"
        try:
            _start_prefect_api(log)
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise TokenmillError(
                f"the embedded Prefect API did not start ({first[:200]}); see {log}, "
                f"or set PREFECT_API_URL to a running Prefect server"
            ) from None
    if svc.mlflow_uri.startswith("sqlite:"):
        from mlflow import MlflowClient

        MlflowClient(svc.mlflow_uri).search_experiments(max_results=1)  # creates the tables when new
