"""The terminal a run talks to: progress bars and status lines on stderr.

stdout stays free for results, so `tokenmill run --json` can end with one JSON line.
Status lines also go to the Prefect flow or task run they are printed in, so the UI's
logs tell the same story as the terminal of an unattended run.
"""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True, highlight=False)


def progress(*extra_columns) -> Progress:
    """A progress bar with count, elapsed time and ETA; plain periodic lines when not a TTY."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=os.environ.get("TOKENMILL_PROGRESS", "1") == "0",
    )


def verbose() -> bool:
    """`tokenmill --verbose`: framework logs show on the terminal. An environment variable,
    TOKENMILL_VERBOSE=1, so Dask workers and torchrun ranks inherit it."""
    return os.environ.get("TOKENMILL_VERBOSE", "") not in ("", "0")


def step(message: str) -> None:
    """One status line (rich markup allowed): on the terminal, and in the Prefect run's logs."""
    console.print(f"[cyan]>[/cyan] {message}", soft_wrap=True)
    to_run_log(Text.from_markup(message).plain)


def to_run_log(message: str, level: int = logging.INFO) -> None:
    """Send `message` to the logs of the Prefect flow or task run this code runs in; outside
    one (`tokenmill train`, a test calling a task's `.fn`), do nothing."""
    if sys.modules.get("prefect") is None:  # no Prefect in this process (or blocked), so no run
        return
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    # The run loggers feed Prefect's API at INFO, and Prefect's terminal handler shows only
    # WARNING and up unless --verbose (runtime.configure_env), so the line is not printed twice.
    get_run_logger().log(level, message)
