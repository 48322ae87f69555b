from prefect.states import Failed

from tasks.core.policy import HideUserErrors, is_transient, retry_transient
from tokenmill.errors import TokenmillError


def failed(exc: BaseException):
    return Failed(data=exc)


def test_user_errors_and_bad_numbers_are_not_retried():
    assert not retry_transient(None, None, failed(TokenmillError("bad config")))
    assert not retry_transient(None, None, failed(FloatingPointError("loss became nan at step 3")))
    assert not is_transient(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))


def test_io_and_network_failures_are_retried():
    assert retry_transient(None, None, failed(OSError("connection reset")))
    assert retry_transient(None, None, failed(TimeoutError("mlflow did not answer")))


def test_prefect_logs_hide_only_user_error_tracebacks():
    import logging
    import sys

    def record(exc):
        try:
            raise exc
        except type(exc):
            return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())

    f = HideUserErrors()
    assert not f.filter(record(TokenmillError("no val rows")))
    assert f.filter(record(RuntimeError("a real bug")))
    state_line = logging.LogRecord(
        "prefect.task_runs",
        logging.ERROR,
        __file__,
        1,
        "Finished in state Failed('Task run encountered an exception TokenmillError: x')",
        None,
        None,
    )
    assert not f.filter(state_line)
