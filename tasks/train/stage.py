"""Training stage: a manifest and a config in, model weights out, metrics to the run.

Prefect adds only policy here: retries for transient failures. A retry finds the run's own
checkpoints in `models_root/<run_id>` and continues from the last good one.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core import stage_cache
from tasks.core.atomic import sha256_file
from tasks.core.policy import retry_transient
from tasks.core.spec import task_spec
from tasks.modeling import checkpoint
from tasks.modeling.local_model import LocalModel
from tasks.train import trainer
from tasks.train.progress import train_with_progress
from tokenmill.config import RunConfig
from tokenmill.console import step
from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive, in_use


def start_tokenizer(start: LocalModel | None, cfg: RunConfig, shards_root: Path, start_uri: str = "") -> Path | None:
    """The tokenizer preprocessing must use: a warm start's own, since its weights only fit it.
    A `tokenizer.reuse` naming another tokenizer is a clear error, not silently overridden."""
    if start is None:
        return None
    if not task_spec(cfg.task).labelled and start.head is not None:
        raise TokenmillError(
            f"{start_uri or start.weights} is a classifier; a language model starts from a language "
            f"model or from scratch (use --task classify to continue the classifier)"
        )
    if cfg.tokenizer.reuse:
        from tasks.core.tokenizer import resolve_reuse

        asked = resolve_reuse(cfg.tokenizer.reuse, Path(shards_root))
        if sha256_file(asked) != start.tokenizer_sha256:
            raise TokenmillError(
                f"cannot warm-start from {start_uri or start.weights}: its tokenizer ({start.tokenizer_sha256[:12]}) "
                f"differs from tokenizer.reuse {cfg.tokenizer.reuse} ({sha256_file(asked)[:12]}); a warm start needs "
                f"the same tokenizer: drop tokenizer.reuse, start from a model built with it, or train from scratch"
            )
    return start.tokenizer


def run_dir(models_root: Path, run_id: str | None, task_run_id: str | None) -> tuple[Path, bool]:
    """The run's out dir, and whether checkpoints found there are an earlier attempt to resume.

    A tracked run owns `models_root/<run_id>` (and an untracked task run its own id), so
    whatever is there was written by an earlier attempt of the same run.
    """
    if run_id:
        return Path(models_root) / run_id, True
    if task_run_id:
        return Path(models_root) / f"untracked-{task_run_id}", True
    return Path(models_root) / f"untracked-{uuid.uuid4().hex[:12]}", False


@task(name="train", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def train_model(
    manifest_path: Path,
    cfg: RunConfig,
    models_root: Path,
    run_id: str | None,
    refresh: bool = False,
    init: LocalModel | None = None,
) -> trainer.TrainResult:
    """Train on the manifest's train split (a language model or, on labelled shards, a
    classifier; from the registered model `init` when given); log per-step metrics to
    `run_id`. Runs `cfg.train.nproc_per_node` ranks through torchrun when > 1. A verified
    earlier result for the same inputs is reused unless `refresh`."""
    from prefect.runtime import task_run

    key = stage_cache.train_key(manifest_path, cfg, init.weights if init else None)
    tracker = RecordingTracker(tracker_for(run_id))
    with exclusive(stage_cache.record_path(models_root, key), f"training the same model (key {key[:12]})"):
        if not refresh and (cached := reuse_training(models_root, key, tracker)):
            return cached
        out_dir, owned = run_dir(models_root, run_id, task_run.id)
        warm = (
            checkpoint.warm_start_source(init.weights, init.gpt_config, init.tokenizer_sha256, init.head)
            if init
            else None
        )
        # `tokenmill gc` skips the shard dir while this run reads it (run_training locks out_dir itself)
        with in_use(Path(manifest_path).resolve().parent):
            return fresh_training(manifest_path, cfg, models_root, key, out_dir, tracker, owned, warm)


def fresh_training(
    manifest_path: Path,
    cfg: RunConfig,
    models_root: Path,
    key: str,
    out_dir: Path,
    tracker: RecordingTracker,
    resume: bool,
    warm: checkpoint.WarmStart | None,
) -> trainer.TrainResult:
    """Train into `out_dir` (continuing from its checkpoints when `resume`) and record the
    result in the stage cache under `key`."""
    manifest = json.loads(Path(manifest_path).read_text())
    earlier = checkpoint.list_checkpoints(out_dir / trainer.CHECKPOINTS)
    result = train_with_progress(manifest_path, manifest, cfg, out_dir, tracker, resume, warm, earlier)
    tracker.log_metrics({"train_tokens": result.tokens, "train_seconds": result.seconds}, step=result.steps)
    value = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}
    record = {"result": value, "history": tracker.history, "params": tracker.params}
    stage_cache.store(models_root, key, [result.weights], record)
    return result


class RecordingTracker:
    """Passes metrics and params on and keeps them, so a cached result can replay them into a new run."""

    def __init__(self, inner: trainer.Tracker):
        self.inner, self.history, self.params = inner, [], {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.history.append([step, {k: float(v) for k, v in metrics.items()}])
        self.inner.log_metrics(metrics, step)

    def log_params(self, params: dict[str, str]) -> None:
        self.params.update(params)
        self.inner.log_params(params)


def reuse_training(models_root: Path, key: str, tracker: RecordingTracker) -> trainer.TrainResult | None:
    """The stored result when its weights still match; its metric history goes to `tracker`."""
    value = stage_cache.lookup(models_root, key)
    if value is None:
        return None
    fields = value["result"]
    for name in ("weights", "checkpoint"):
        fields[name] = Path(fields[name]) if fields.get(name) else None
    step(f"training cached: {fields['weights']} (verified, key {key[:12]})")
    for step_no, metrics in value["history"]:
        tracker.log_metrics(metrics, step=step_no)
    if value.get("params"):  # a budgeted run's resolved shapes
        tracker.log_params(value["params"])
    return trainer.TrainResult(**fields)


def tracker_for(run_id: str | None) -> trainer.Tracker:
    if not run_id:
        return trainer.NullTracker()
    from tasks.run.tracking import MlflowTracker

    return MlflowTracker(run_id)
