"""Retry policy shared by the stages: retry what may pass on its own, fail fast on the rest.

A user error (bad config or data, `TokenmillError`), a server refusing our credentials, a
non-finite loss or running out of memory fails the same way every time, so retrying only
delays the message.
"""

from __future__ import annotations

import logging
import re

from tokenmill.credentials import refused_status
from tokenmill.errors import TokenmillError

# A final state's text naming an error the CLI reports in one line: a user error, or a refusal
# by MLflow ("failed with error code 403") or Prefect ("'401 Unauthorized'").
REPORTED_IN_ONE_LINE = re.compile(r"TokenmillError|failed with error code 40[13]|'40[13] [A-Z]")

DETERMINISTIC = (TokenmillError, FloatingPointError, MemoryError, ValueError, TypeError, KeyError)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DETERMINISTIC) or refused_status(exc):
        return False
    return "out of memory" not in str(exc).lower()


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only failures that `is_transient`."""
    try:
        state.result()
    except BaseException as exc:  # the state carries the task's exception
        return is_transient(exc)
    return True


# The retry settings stages pass to Prefect's @task. A stage whose failures may pass on their own
# (a busy database, a network blip) tries twice more, after about 2 s and 10 s, jittered so that
# overlapping runs do not retry in step; tracking calls are cheap and try three times, sooner.
TRANSIENT_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_jitter_factor": 0.5,
                     "retry_condition_fn": retry_transient}  # fmt: skip
TRACKING_RETRIES = {"retries": 3, "retry_delay_seconds": [1, 4, 10], "retry_jitter_factor": 0.5,
                    "retry_condition_fn": retry_transient}  # fmt: skip


class HideUserErrors(logging.Filter):
    """Keep Prefect from logging a traceback for an error the CLI reports in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TokenmillError) or (exc is not None and refused_status(exc)):
            return False
        # Prefect also logs the final state as text ("Finished in state Failed(... TokenmillError: ...)").
        return not REPORTED_IN_ONE_LINE.search(record.getMessage())


def hide_user_error_tracebacks() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.engine"):
        logging.getLogger(name).addFilter(HideUserErrors())
