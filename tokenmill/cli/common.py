"""What every command group of the CLI shares: one way to report a user error, and the task option."""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum

import typer

from tokenmill.credentials import refusal
from tokenmill.errors import TokenmillError


@contextmanager
def user_errors():
    try:
        yield
    except TokenmillError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # a server that refused our credentials is a user error too
        err = refusal(exc)
        if err is None:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


class Task(str, Enum):
    lm = "lm"
    classify = "classify"


def require_labels(plan) -> None:
    """A classifier needs a labelled corpus: say which catalog fields make one, before anything is written."""
    from tasks.core.spec import task_spec

    if task_spec(plan.config.task).labelled and not plan.corpus.entry.labelled:
        raise TokenmillError(
            f"corpus '{plan.corpus.name}' has no labels, so it cannot train a classifier: set label_field "
            f"(JSON Lines or Parquet) or label_dirs: true (one directory per class) in its catalog entry, "
            f"or use --task lm"
        )
