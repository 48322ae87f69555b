"""Weekly clean-up of the state dir as a flow: the `gc` deployment runs it on a schedule.

    tokenmill gc [--dry-run] [--keep-last N]     # the same logic from the command line
"""

from __future__ import annotations

from prefect import flow

from tasks.gc import MIN_AGE_S, collect_garbage
from tokenmill import runtime


@flow(name="tokenmill-gc", log_prints=False)
def gc(keep_last: int = 3, dry_run: bool = False, min_age_s: float = MIN_AGE_S) -> dict:
    runtime.configure()  # in a worker process too: the state dir and MLflow URI from TOKENMILL_HOME
    return collect_garbage(keep_last, dry_run, min_age_s)
