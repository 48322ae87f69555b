"""Shared test setup: quiet, offline, and isolated from the developer's own state dir."""

import os
import tempfile

# Before prefect or mlflow is imported anywhere: a private Prefect home, no telemetry.
_home = tempfile.mkdtemp(prefix="tokenmill-tests-")
os.environ["PREFECT_HOME"] = os.path.join(_home, "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
os.environ["TOKENMILL_HOME"] = os.path.join(_home, "state")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("TOKENMILL_DASK_ADDRESS", None)


E2E = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e") + os.sep


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/ is end-to-end (`make test-fast` leaves it out, with any test
    marked e2e elsewhere: those that start ranks, subprocesses or tracking servers)."""
    import pytest

    for item in items:
        if str(item.path).startswith(E2E):
            item.add_marker(pytest.mark.e2e)
