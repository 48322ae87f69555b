"""A server's refusal is one line naming the server and the variable to set, is never retried,
and no URL tokenmill prints carries a password. (The real servers refusing for real:
tests/e2e/test_real_servers.py.)"""

from __future__ import annotations

import logging

import httpx
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

from tasks.core.policy import HideUserErrors, is_transient
from tokenmill.credentials import prefect_headers, redact, refusal


def prefect_error(status: int, auth: str | None = None) -> httpx.HTTPStatusError:
    headers = {"Authorization": auth} if auth else {}
    request = httpx.Request("POST", "http://prefect.internal:4200/api/flow_runs/filter", headers=headers)
    response = httpx.Response(status, request=request, json={"exception_message": "Unauthorized"})
    return httpx.HTTPStatusError(f"Client error '{status}'", request=request, response=response)


def mlflow_error(code: int, endpoint: str = "/api/2.0/mlflow/registered-models/alias") -> MlflowException:
    status = 401 if code == UNAUTHENTICATED else 403
    return MlflowException(f"API request to endpoint {endpoint} failed with error code {status} != 200", code)


def test_a_prefect_401_names_the_server_and_the_variable(monkeypatch):
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    none_sent = str(refusal(prefect_error(401)))
    assert none_sent.startswith("the Prefect server at http://prefect.internal:4200/api needs credentials")
    assert "PREFECT_API_AUTH_STRING" in none_sent and "\n" not in none_sent
    assert "did not accept the credentials sent" in str(refusal(prefect_error(401, auth="Basic eDp5")))


def test_an_mlflow_refusal_says_who_lacks_what(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://svc:hunter2@mlflow.internal")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    unauthenticated = str(refusal(mlflow_error(UNAUTHENTICATED)))
    assert "the MLflow server at https://mlflow.internal did not accept" in unauthenticated
    assert "MLFLOW_TRACKING_USERNAME" in unauthenticated and "hunter2" not in unauthenticated
    denied = str(refusal(mlflow_error(PERMISSION_DENIED)))
    assert "denied reader permission for registered-models/alias (403)" in denied


def test_other_failures_are_not_refusals():
    assert refusal(prefect_error(500)) is None
    assert refusal(MlflowException("no such model")) is None
    assert refusal(ValueError("x")) is None


def test_a_refusal_is_not_retried_and_its_traceback_is_hidden():
    for exc in (prefect_error(401), mlflow_error(PERMISSION_DENIED)):
        assert not is_transient(exc)
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed", None, (None, exc, None))
        assert not HideUserErrors().filter(record)
    assert is_transient(prefect_error(503))
    final_state = "Finished in state Failed('... failed with error code 403 != 200 ...')"
    assert not HideUserErrors().filter(logging.LogRecord("prefect.flow_runs", 40, __file__, 1, final_state, None, None))


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://admin:pw@prefect.internal:4200/api", "http://prefect.internal:4200/api"),
        ("https://u:p@mlflow.internal", "https://mlflow.internal"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
    ],
)
def test_redact_drops_user_and_password(url, shown):
    assert redact(url) == shown


def test_prefect_headers_send_what_prefects_client_sends(monkeypatch):
    monkeypatch.delenv("PREFECT_API_KEY", raising=False)
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    assert prefect_headers() == {}
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_key")
    assert prefect_headers() == {"Authorization": "Bearer pnu_key"}
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:pass")
    assert prefect_headers() == {"Authorization": "Basic YWRtaW46cGFzcw=="}  # the auth string wins, as in Prefect
