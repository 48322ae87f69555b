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
