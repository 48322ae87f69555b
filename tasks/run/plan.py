"""Resolve what a run will do, before anything is written: corpus, config and locations.

Every command calls `plan_run` to validate its inputs (without importing Prefect); the flow
runs the same function as its first task (`plan_task.plan_run_task`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_catalog.loader import Corpus, resolve_corpus
from tokenmill.config import RunConfig, deep_merge, parse_assignments, resolve_config
from tokenmill.runtime import check_dask_address, services


@dataclass(frozen=True)
class RunPlan:
    corpus: Corpus
    config: RunConfig
    shards_root: Path
    models_root: Path
    dask_address: str | None


def plan_run(
    corpus: str,
    preset: str = "default",
    overrides: list[str] | None = None,
    catalog: str | None = None,
    max_steps: int | None = None,
    task: str | None = None,
) -> RunPlan:
    """Validate every input and resolve the config: defaults < preset < catalog < overrides.
    The catalog entry decides the task (classify when it has labels); `task` (--task) overrides it."""
    cli = parse_assignments(overrides or [])
    if max_steps is not None:
        cli = deep_merge(cli, {"train": {"max_steps": max_steps}})
    if task is not None:
        cli = deep_merge(cli, {"task": task})
    resolved = resolve_corpus(corpus, Path(catalog) if catalog else None, cli.get("task"))
    entry = {"data": resolved.entry.data, "tokenizer": resolved.entry.tokenizer, "task": resolved.entry.task}
    cfg = resolve_config(preset, entry, cli)
    svc = services()
    check_dask_address(svc.dask_address)
    return RunPlan(resolved, cfg, svc.state_dir / "shards", svc.state_dir / "models", svc.dask_address)
