"""Training stage: a manifest and a config in, model weights out, metrics to the run."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from rich.progress import TextColumn

from tasks import trainer
from tasks.tracking import MlflowTracker
from tokenmill.config import RunConfig
from tokenmill.console import progress, step
from tokenmill.errors import TokenmillError


@task(name="train", cache_policy=NO_CACHE)
def train_model(manifest_path: Path, cfg: RunConfig, models_root: Path, run_id: str | None) -> trainer.TrainResult:
    """Train a fresh model on the manifest's train split; log per-step metrics to `run_id`."""
    out_dir = Path(models_root) / (run_id or "untracked")
    tracker = MlflowTracker(run_id) if run_id else trainer.NullTracker()
    device = trainer.pick_device(cfg.train.device)
    step(f"training on {device}: {cfg.model.n_layer} layers x {cfg.model.n_embd} wide, {cfg.train.max_steps} steps")
    with progress(TextColumn("loss {task.fields[loss]}")) as bar:
        job = bar.add_task("training", total=cfg.train.max_steps, loss="-")
        try:
            result = trainer.train(
                manifest_path, cfg, out_dir, tracker,
                on_step=lambda done, loss: bar.update(job, completed=done, loss=f"{loss:.3f}"),
            )
        except FloatingPointError as exc:
            raise TokenmillError(str(exc)) from None
    tracker.log_metrics({"train_tokens": result.tokens, "train_seconds": result.seconds}, step=result.steps)
    return result
