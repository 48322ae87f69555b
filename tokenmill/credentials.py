"""Who tokenmill is to the servers it talks to, and one line when a server says no.

A Prefect server started with PREFECT_SERVER_API_AUTH_STRING and an MLflow server running its
basic-auth app refuse requests without credentials (401) or from a user who lacks the permission
(403). Their clients raise exceptions whose text is a traceback's worth of URL and response body;
`refusal` turns either into one line naming the server and the variable to set, so the CLI, the
retry policy (a refusal never passes on its own) and the log filter all treat it as a user error.
`check_servers` asks both servers once, before a run writes or trains anything.

Credentials are read by Prefect's and MLflow's own clients from the environment
(PREFECT_API_AUTH_STRING or PREFECT_API_KEY; MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD,
or MLFLOW_TRACKING_TOKEN). tokenmill never copies them anywhere, and every URL it prints goes
through `redact` first.
"""

from __future__ import annotations

import base64
import getpass
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from tokenmill.errors import TokenmillError

PREFECT_CREDENTIALS = "PREFECT_API_AUTH_STRING (user:password, as the server's PREFECT_SERVER_API_AUTH_STRING)"
MLFLOW_CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
# The MLflow permissions, weakest first (mlflow.server.auth.permissions).
LEVELS = ("NO_PERMISSIONS", "READ", "USE", "EDIT", "MANAGE")


def redact(url: str) -> str:
    """`url` without a user or password in it (http://user:pw@host -> http://host)."""
    parts = urlsplit(url)
    if not parts.username and not parts.password:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def refused_status(exc: BaseException) -> int | None:
    """401 or 403 when a server refused a request for its credentials or its user; else None.
    Prefect's client raises httpx errors (`.response.status_code`), MLflow's an MlflowException
    (`get_http_status_code()`)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is None and callable(getattr(exc, "get_http_status_code", None)):
        status = exc.get_http_status_code()
    return status if status in (401, 403) else None


def refusal(exc: BaseException) -> TokenmillError | None:
    """The one-line error for a refused request, or None when `exc` is something else."""
    status = refused_status(exc)
    if status is None:
        return None
    if callable(getattr(exc, "get_http_status_code", None)):
        found = re.search(r"endpoint (\S+)", str(getattr(exc, "message", exc)))
        return _mlflow_refusal(status, found.group(1) if found else None)
    request = getattr(exc, "request", None)
    url = str(request.url) if request is not None else os.environ.get("PREFECT_API_URL", "?")
    server = f"the Prefect server at {redact(_api_root(url))}"
    if status == 401:
        sent = request is not None and "authorization" in request.headers
        why = "did not accept the credentials sent" if sent else "needs credentials and none were sent"
        return TokenmillError(f"{server} {why} (401): set {PREFECT_CREDENTIALS}")
    return TokenmillError(f"{server} denied the request (403): check PREFECT_API_AUTH_STRING or PREFECT_API_KEY")


def _mlflow_refusal(status: int, endpoint: str | None) -> TokenmillError:
    server = f"the MLflow server at {redact(os.environ.get('MLFLOW_TRACKING_URI', '?'))}"
    if status == 401:
        sent = os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN")
        why = "did not accept the credentials sent" if sent else "needs credentials and none were sent"
        return TokenmillError(f"{server} {why} (401): set {MLFLOW_CREDENTIALS}")
    what = endpoint.removeprefix("/api/2.0/mlflow/") if endpoint else "this request"
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "this user"
    return TokenmillError(
        f"{server} denied {user} permission for {what} (403): run as a user who holds it, "
        f"or ask an MLflow admin to grant it (deploy/README.md)"
    )


def raise_refusal(exc: BaseException) -> None:
    """Raise the one-line error when `exc` is a refusal; for the handlers that turn other
    failures of a call into their own message ("no such version")."""
    if (err := refusal(exc)) is not None:
        raise err from None


def _api_root(url: str) -> str:
    """http://host:4200/api/flows/filter -> http://host:4200/api"""
    head, sep, _ = url.partition("/api/")
    return head + "/api" if sep else url


def prefect_headers() -> dict[str, str]:
    """The Authorization header Prefect's own client sends: basic auth from PREFECT_API_AUTH_STRING,
    else a bearer PREFECT_API_KEY (Prefect Cloud); none without either."""
    if auth := os.environ.get("PREFECT_API_AUTH_STRING"):
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    if key := os.environ.get("PREFECT_API_KEY"):
        return {"Authorization": f"Bearer {key}"}
    return {}


def check_servers(model_name: str | None = None) -> None:
    """Before a run writes anything: the Prefect server (when PREFECT_API_URL names one) and the
    MLflow server (when MLFLOW_TRACKING_URI is http[s]) accept our credentials, and, when
    `model_name` is registered already, this user may add versions to it."""
    from tokenmill.runtime import services

    svc = services()
    if svc.prefect_api_url:
        check_prefect(svc.prefect_api_url)
    if svc.mlflow_uri.startswith(("http://", "https://")):
        check_mlflow(svc.mlflow_uri, model_name)


def check_prefect(api_url: str, timeout: float = 15.0) -> None:
    import httpx

    try:
        response = httpx.get(f"{api_url.rstrip('/')}/admin/version", headers=prefect_headers(), timeout=timeout)
    except httpx.HTTPError as exc:
        raise TokenmillError(
            f"cannot reach the Prefect server at {redact(api_url)} ({type(exc).__name__}); check PREFECT_API_URL"
        ) from None
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise (refusal(exc) or TokenmillError(f"the Prefect server at {redact(api_url)} answered {exc}")) from None


def check_mlflow(uri: str, model_name: str | None) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri, uri)
    try:
        client.search_experiments(max_results=1)
        exists = bool(model_name) and bool(client.search_registered_models(f"name='{model_name}'", max_results=1))
    except MlflowException as exc:
        raise (refusal(exc) or exc) from None
    if exists:
        require_model_permission(model_name, "EDIT", "register versions of")


@dataclass(frozen=True)
class Identity:
    username: str
    is_admin: bool


def mlflow_identity() -> Identity | None:
    """The user the MLflow server knows us as, or None when it has no auth app (or is not a server)."""
    found = _auth_api("/api/2.0/mlflow/users/current")
    return None if found is None else Identity(found["user"]["username"], bool(found["user"].get("is_admin")))


def require_model_permission(name: str, level: str, action: str) -> str:
    """Who is acting, for the record; a one-line error unless that user holds `level` (EDIT,
    MANAGE) on registered model `name`. Without an auth app on the server (or without a
    server) there is no identity to check, and the local user is named instead."""
    identity = mlflow_identity()
    if identity is None:
        return f"{getpass.getuser()}@{socket.gethostname()} (no registry login)"
    if identity.is_admin:
        return identity.username
    params = {"username": identity.username, "resource_type": "registered_model", "resource_id": name}
    held = _auth_api("/api/3.0/mlflow/users/permissions/get", params)["permission"]
    if (LEVELS.index(held) if held in LEVELS else 0) < LEVELS.index(level):
        raise TokenmillError(
            f"{identity.username} may not {action} {name} on the MLflow server at "
            f"{redact(os.environ.get('MLFLOW_TRACKING_URI', '?'))}: that needs {level} on the registered model "
            f"and the user holds {held}; ask an MLflow admin to grant {level} (deploy/README.md), "
            f"or run as a user who holds it"
        )
    return identity.username


def _auth_api(path: str, params: dict | None = None) -> dict | None:
    """GET one endpoint of MLflow's basic-auth app; None when the server has no such app. (Its
    own client, mlflow.server.auth.client, imports the whole server app to get here.)"""
    import mlflow
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    response = http_request(get_default_host_creds(uri), path, "GET", params=params)
    if response.status_code == 404:
        return None
    if response.status_code in (401, 403):
        raise _mlflow_refusal(response.status_code, path)
    return response.json()
