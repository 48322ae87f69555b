"""Status lines reach the Prefect run's logs; framework logs reach the terminal only with --verbose."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from prefect import flow, task
from prefect.testing.utilities import prefect_test_harness

from tokenmill import runtime
from tokenmill.console import step


@task
def stage_that_reports():
    step("[bold]training[/] on cpu: 2 layers")


@flow
def flow_that_reports(summary: dict) -> str:
    from prefect.runtime import flow_run

    from tasks.run.summary import publish_summary

    step("planning done")
    stage_that_reports()
    publish_summary(summary)
    return flow_run.get_id()


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_status_lines_and_the_summary_reach_the_prefect_run_logs(tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    monkeypatch.delenv("TOKENMILL_VERBOSE", raising=False)
    # What every command does first (runtime.configure_env): the run loggers at INFO, also
    # after Prefect sets its logging up again from the environment.
    for name in ("FLOW_RUNS", "TASK_RUNS"):
        monkeypatch.setenv(f"PREFECT_LOGGING_LOGGERS_PREFECT_{name}_LEVEL", "INFO")
    runtime.quiet_framework_noise()
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps({"shards": [{"path": "train-00000.arrow", "split": "train", "rows": 3, "sha256": "s" * 64}]})
    )
    summary = {
        "task": "lm",
        "model_name": "tokenmill-lm",
        "model_version": "4",
        "aliases": ["champion"],
        "val_loss": 2.5,
        "val_ppl": 12.18,
        "val_bpb": 1.25,
        "eval_set_sha256": "e" * 64,
        "decision": "promoted",
        "manifest": str(manifest),
        "mlflow_run_id": "r1",
    }
    with prefect_test_harness(server_startup_timeout=180):
        flow_run_id = flow_that_reports(summary)
        APILogHandler().flush()  # the worker sends logs in batches
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=0)
    by_message = {log.message: log for log in logs}
    assert by_message["planning done"].task_run_id is None  # the flow's own line
    assert by_message["training on cpu: 2 layers"].task_run_id is not None  # a task's, markup stripped
    assert by_message["training on cpu: 2 layers"].level == logging.INFO
    text = next(m for m in by_message if m.startswith("run summary"))
    assert "tokenmill-lm v4 (champion)" in text and "1.2500 bits/byte" in text and "promoted" in text


def test_outside_a_prefect_run_a_status_line_only_prints(capsys):
    step("[bold]resuming[/] from step 4")
    assert capsys.readouterr().err.strip() == "> resuming from step 4"


def terminal_after_configure(verbose: bool) -> str:
    """What Prefect's own terminal handler prints of a run logger's INFO and WARNING lines."""
    script = textwrap.dedent(
        """
        import logging
        from tokenmill import runtime
        runtime.configure_env()
        from prefect import flow  # prefect.main sets up Prefect's logging from the environment left
        for level in (logging.INFO, logging.WARNING):
            logging.getLogger("prefect.task_runs").log(level, "line at %s", logging.getLevelName(level),
                                                       extra={"send_to_api": False, "task_run_name": "t"})
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    env["TOKENMILL_VERBOSE"] = "1" if verbose else "0"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_run_logs_print_on_the_terminal_only_when_verbose():
    quiet = terminal_after_configure(verbose=False)
    assert "line at WARNING" in quiet and "line at INFO" not in quiet  # step() already printed it
    assert "line at INFO" in terminal_after_configure(verbose=True)


def test_verbose_raises_framework_loggers_to_info(monkeypatch):
    monkeypatch.setenv("TOKENMILL_VERBOSE", "1")
    runtime.quiet_framework_noise()
    try:
        levels = {name: logging.getLogger(name).level for name in ("prefect", "mlflow", "distributed", "alembic")}
        assert set(levels.values()) == {logging.INFO}
        assert logging.getLogger("sqlalchemy").level == logging.WARNING  # not one line per SQL statement
    finally:
        monkeypatch.setenv("TOKENMILL_VERBOSE", "0")
        runtime.quiet_framework_noise()
    assert logging.getLogger("prefect").level == logging.ERROR
    assert logging.getLogger("prefect.task_runs").level == logging.INFO
