"""The terminal a run talks to: progress bars and status lines on stderr.

stdout stays free for results, so `tokenmill run --json` can end with one JSON line.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


def step(message: str) -> None:
    console.print(f"[cyan]>[/cyan] {message}", soft_wrap=True)
