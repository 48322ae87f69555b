"""Weekly clean-up of the state dir as a flow: the `gc` deployment runs it on a schedule.

tokenmill gc [--dry-run] [--keep-last N]     # the same logic from the command line
"""

from __future__ import annotations

from prefect import flow

from tasks.gc import collect_garbage
from tasks.gc.collect import MIN_AGE_S
from tasks.registry import registered_versions_task
from tokenmill import runtime


@flow(name="tokenmill-gc", log_prints=False)
def gc(keep_last: int = 3, dry_run: bool = False, min_age_s: float = MIN_AGE_S) -> dict:
    runtime.configure()  # in a worker process too: the state dir and MLflow URI from TOKENMILL_HOME
    versions = registered_versions_task()
    return collect_garbage(versions, keep_last, dry_run, min_age_s)
