"""Where state lives and which services a run talks to.

Embedded by default: Prefect's ephemeral API with its home under the state dir, a Dask
LocalCluster, and MLflow on SQLite under the state dir. Setting PREFECT_API_URL,
MLFLOW_TRACKING_URI or TOKENMILL_DASK_ADDRESS points the same code at real servers.
Call `configure()` before prefect or mlflow is imported.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import TokenmillError


@dataclass(frozen=True)
class Services:
    state_dir: Path
    mlflow_uri: str
    artifact_root: str | None  # None when a tracking server chooses artifact locations
    dask_address: str | None
    prefect_api_url: str | None


def state_dir() -> Path:
    return Path(os.environ.get("TOKENMILL_HOME", ".tokenmill")).expanduser().resolve()


def services() -> Services:
    """The services in force, read from the environment without changing anything."""
    state = state_dir()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state / 'mlflow.db'}"
    local_store = uri.startswith("sqlite:") or uri.startswith("file:")
    return Services(
        state_dir=state,
        mlflow_uri=uri,
        artifact_root=(state / "mlartifacts").as_uri() if local_store else None,
        dask_address=os.environ.get("TOKENMILL_DASK_ADDRESS") or None,
        prefect_api_url=os.environ.get("PREFECT_API_URL") or None,
    )


# A Dask scheduler runs whatever functions its clients send, so a plain-TCP one off this
# machine lets anyone on the network run code on the workers. TLS needs these three files.
DASK_TLS_VARS = ("TOKENMILL_DASK_TLS_CA_FILE", "TOKENMILL_DASK_TLS_CERT", "TOKENMILL_DASK_TLS_KEY")
DASK_INSECURE_OPT_IN = "TOKENMILL_DASK_ALLOW_INSECURE"
LOOPBACK_HOSTS = ("localhost", "127.", "[::1]", "::1")


def check_dask_address(address: str | None) -> None:
    """A clear error, before anything is written, for a Dask scheduler tokenmill will not use:
    `tls://` without the certificate files, or plain TCP (or ws://) off this machine unless
    TOKENMILL_DASK_ALLOW_INSECURE=1 says the network is trusted."""
    if not address:
        return
    scheme, sep, rest = address.partition("://")
    scheme, rest = (scheme, rest) if sep else ("tcp", address)
    if scheme in ("tls", "wss"):
        missing = [name for name in DASK_TLS_VARS if not os.environ.get(name)]
        if missing:
            raise TokenmillError(
                f"Dask scheduler {address} uses TLS but {', '.join(missing)} is not set: "
                f"set {', '.join(DASK_TLS_VARS)} to the CA, client certificate and key files"
            )
        return
    host = rest.rsplit(":", 1)[0] if rest.count(":") == 1 or rest.startswith("[") else rest
    if scheme in ("tcp", "ws") and not host.startswith(LOOPBACK_HOSTS) and os.environ.get(DASK_INSECURE_OPT_IN) != "1":
        raise TokenmillError(
            f"refusing the unencrypted Dask scheduler {address}: anyone who reaches it can run code on its "
            f"workers; use a tls:// address with {', '.join(DASK_TLS_VARS)} set, or set "
            f"{DASK_INSECURE_OPT_IN}=1 on a network you trust"
        )


def configure_env() -> Services:
    """Point Prefect and MLflow at the state dir unless real servers are set, and choose what the
    terminal shows (framework logs only with --verbose). Writes nothing."""
    from tokenmill.console import verbose

    svc = services()
    loud = verbose()
    defaults = {
        "PREFECT_HOME": str(svc.state_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # The CLI draws its own progress; Prefect's INFO lines would bury it. Flow and task run
        # logs still reach Prefect's API (the UI's logs) at INFO: only its terminal handler is raised.
        "PREFECT_LOGGING_LEVEL": "INFO" if loud else "WARNING",
        "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO",
        **({} if loud else {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}),
        "MLFLOW_TRACKING_URI": svc.mlflow_uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_LOGGING_LEVEL": "INFO" if loud else "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    quiet_framework_noise()
    return svc


def configure() -> Services:
    """`configure_env`, then create the state dir: call it once inputs are known to be good."""
    svc = configure_env()
    svc.state_dir.mkdir(parents=True, exist_ok=True)
    return svc


def quiet_framework_noise() -> None:
    """Framework logs and warnings off the terminal, or at INFO with `tokenmill --verbose`."""
    from tokenmill.console import verbose

    loud = verbose()
    for name in ("alembic", "mlflow", "distributed", "prefect"):
        logging.getLogger(name).setLevel(logging.INFO if loud else logging.ERROR)
    for name in ("sqlalchemy", "urllib3"):  # at INFO, SQLAlchemy logs every statement
        logging.getLogger(name).setLevel(logging.WARNING if loud else logging.ERROR)
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # they feed the Prefect UI's logs
        logging.getLogger(name).setLevel(logging.INFO)
    if loud:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*pydantic.*")
    # MLflow nags about type hints and input examples; the signature is declared on purpose.
    warnings.filterwarnings(
        "ignore", message=r".*(Add type hints|An input example was not provided|dataset source can be interpreted)"
    )
