"""What a person watching training sees, the same from `tokenmill train` and from the pipeline:
a status line naming the device, shapes and data, then a progress bar with loss and tokens/s."""

from __future__ import annotations

from pathlib import Path

from rich.progress import TextColumn

from tasks.core.spec import task_spec
from tasks.modeling.checkpoint import WarmStart
from tasks.modeling.parallel import pick_device
from tasks.train import trainer
from tasks.train.budget import budgeted
from tasks.train.launch import Topology, run_training
from tokenmill.console import progress, step


def row_words(manifest: dict) -> str:
    """How the shards' rows read: a context length, or documents and classes."""
    if task_spec(manifest.get("task")).labelled:
        return f"documents of up to {manifest['row_len']} tokens, {len(manifest.get('labels', []))} classes"
    return f"context {manifest['row_len'] - 1}"


def train_with_progress(
    manifest_path: Path,
    manifest: dict,
    cfg,
    out_dir: Path,
    tracker: trainer.Tracker,
    resume: bool,
    warm: WarmStart | None,
    earlier: list[Path],
    topology: Topology | None = None,
) -> trainer.TrainResult | None:
    """`launch.run_training`, announced and with a progress bar; `earlier` are the checkpoints
    it continues from (shown when resuming). A `train.budget_s` is resolved first (tasks.train.budget)."""
    if cfg.train.budget_s:
        cfg = budgeted(manifest_path, manifest, cfg, out_dir, bool(earlier and resume), tracker, warm is not None)
    topology = topology or Topology(cfg.train.nproc_per_node)
    ranks = f" x {topology.nproc_per_node * topology.nnodes} ranks" if topology.distributed else ""
    step(
        f"training on {pick_device(cfg.train.device)}{ranks}: {cfg.model.n_layer} layers x {cfg.model.n_embd} wide, "
        f"{row_words(manifest)}, {cfg.train.max_steps} steps -> {out_dir}"
    )
    if earlier and resume:
        step(f"resuming from {earlier[-1]}")
    with progress(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s")) as bar:
        job = bar.add_task("training", total=cfg.train.max_steps, loss="-", tps="-")
        return run_training(
            manifest_path,
            cfg,
            out_dir,
            tracker,
            on_step=lambda done, loss, tps: bar.update(job, completed=done, loss=f"{loss:.3f}", tps=f"{tps:,.0f}"),
            resume=resume,
            warm=warm,
            topology=topology,
        )
