"""`tokenmill train`: train a GPT on a shards manifest, with no Prefect server or MLflow needed.

    tokenmill train --shards .tokenmill/shards/<corpus>-<key>/manifest.json --preset tiny --json
    tokenmill train --task classify --shards <labelled shards>/manifest.json --init-from <lm run>/model.pt
    tokenmill train --shards M --resume                        # continue from the last checkpoint
    tokenmill train --shards M --nproc-per-node 4              # 4 ranks on this machine (torchrun)
    tokenmill train --shards M --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500   # on each node

Progress goes to stderr; with --json the last stdout line is one JSON object of the result.
User errors print one `error:` line and exit with status 2.

With MLFLOW_TRACKING_URI set, the run is tracked: one MLflow run in the pipeline's experiment,
with the resolved config as params, per-step metrics from rank 0 and system metrics; its id is
`mlflow_run_id` in the --json object. Without it, nothing is tracked (the embedded SQLite store
of `tokenmill run` is not used on its own).

    MLFLOW_TRACKING_URI=sqlite:///$PWD/.tokenmill/mlflow.db tokenmill train --shards M --json
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

from tokenmill.cli.common import user_errors
from tokenmill.errors import TokenmillError


def train(
    shards: Path = typer.Option(..., "--shards", help="The manifest.json of a shards directory."),
    preset: str = typer.Option("default", help="Named preset: tiny, default, small, medium."),
    max_steps: int | None = typer.Option(None, min=1, help="Override train.max_steps."),
    budget: str | None = typer.Option(
        None, "--budget", help="Train for this long (90s, 10m, 1h): shapes, lr and steps fit the hardware."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override any field: SECTION.FIELD=VALUE (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last good checkpoint in --out."),
    checkpoint_every: int | None = typer.Option(None, min=0, help="Steps between checkpoints (0: only at the end)."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:N or mps (default: auto)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    out: Path | None = typer.Option(None, help="Run directory (default: $TOKENMILL_HOME/train/<shards>-<preset>)."),
    init_from: Path | None = typer.Option(None, help="Warm-start from these weights (a finished run's model.pt)."),
    init_tokenizer_sha256: str | None = typer.Option(
        None, help="Tokenizer sha256 of --init-from, if no model.json is beside it."
    ),
    as_json: bool = typer.Option(False, "--json", help="End stdout with one JSON object of the result."),
    task: str | None = typer.Option(
        None, "--task", help="lm or classify (default: the task the shards were built for)."
    ),
    nproc_per_node: int | None = typer.Option(None, min=1, help="Ranks on this machine; > 1 launches torchrun."),
    nnodes: int = typer.Option(1, min=1, help="Machines in the run (each runs this same command)."),
    rdzv_endpoint: str | None = typer.Option(None, help="HOST:PORT of the rendezvous when --nnodes > 1."),
    rdzv_id: str = typer.Option("tokenmill", help="Rendezvous id shared by the nodes of one run."),
) -> None:
    """Train a model on SHARDS: checkpoints and weights in --out, no tracking server needed."""
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")  # only one set on purpose; configure_env fills in a default
    with user_errors():
        from tokenmill import runtime
        from tokenmill.config import deep_merge, parse_assignments, parse_duration, resolve_config

        runtime.configure_env()
        manifest = read_manifest(shards)
        flags = {
            "max_steps": max_steps,
            "checkpoint_every": checkpoint_every,
            "device": device,
            "compile": compile or None,
            "nproc_per_node": nproc_per_node,
            "budget_s": parse_duration(budget) if budget is not None else None,
        }
        overrides = deep_merge(parse_assignments(set_), {"train": {k: v for k, v in flags.items() if v is not None}})
        overrides["task"] = shards_task(task, manifest, shards)
        cfg = resolve_config(preset, None, overrides)
        if cfg.train.budget_s and nnodes > 1:
            raise TokenmillError(
                "train.budget_s plans on one machine, and each of --nnodes would plan its own shapes; "
                "set the shapes and train.max_steps for a multi-node run"
            )
        out_dir = out or default_out(shards, preset)
        warm, earlier = preflight(shards, manifest, out_dir, resume, init_from, init_tokenizer_sha256)
        with tracking(tracking_uri, cfg, shards, manifest, out_dir, rank0_here=nnodes == 1) as tracker:
            result = run(shards, manifest, cfg, out_dir, resume, warm, earlier, nnodes, rdzv_endpoint, rdzv_id, tracker)
            if result is not None:  # what the pipeline's training stage logs at its end, too
                tracker.log_metrics({"train_tokens": result.tokens, "train_seconds": result.seconds}, step=result.steps)
        summary = report(result, out_dir, tracker.run_id)
        if as_json:
            sys.stdout.write(json.dumps(summary, default=str) + "\n")


def read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise TokenmillError(
            f"shards manifest not found: {path}; pass the manifest.json of a shards directory "
            f"(`tokenmill run` writes them under $TOKENMILL_HOME/shards/)"
        )
    try:
        manifest = json.loads(path.read_text())
        manifest["row_len"], manifest["tokenizer"]["sha256"], manifest["shards"]  # noqa: B018
    except (ValueError, KeyError, TypeError):
        raise TokenmillError(f"{path} is not a shards manifest (no row_len, tokenizer or shards)") from None
    return manifest


def shards_task(task: str | None, manifest: dict, shards: Path) -> str:
    """The task to train: the shards' own unless --task names it, and then they must agree."""
    from tasks.core.spec import task_spec

    built_for = task_spec(manifest.get("task")).name
    if task is None:
        return built_for
    if task != built_for:
        source = "a labelled corpus" if task_spec(task, "--task").labelled else "an unlabelled corpus"
        raise TokenmillError(
            f"{shards} holds {built_for} shards, not {task} ones; "
            f"pass --task {built_for}, or build {task} shards from {source} with `tokenmill preprocess`"
        )
    return task


def default_out(shards: Path, preset: str) -> Path:
    from tokenmill.runtime import state_dir

    return state_dir() / "train" / f"{shards.resolve().parent.name}-{preset}"


def preflight(shards, manifest, out_dir, resume, init_from, init_tokenizer_sha256):
    """The user errors found before anything is written or tracked; the warm start and earlier checkpoints."""
    from tasks.modeling import checkpoint
    from tasks.train.trainer import CHECKPOINTS

    warm = checkpoint.warm_start_source(init_from, None, init_tokenizer_sha256) if init_from else None
    if warm is not None and warm.tokenizer_sha256 != manifest["tokenizer"]["sha256"]:
        raise TokenmillError(
            f"cannot warm-start from {init_from}: it was trained with tokenizer {warm.tokenizer_sha256[:12]}, "
            f"the shards {shards} use {manifest['tokenizer']['sha256'][:12]}; train on shards built with its "
            f"tokenizer (tokenizer.reuse=<its tokenizer.model>) or from scratch"
        )
    return warm, checkpoint.earlier_checkpoints(out_dir, Path(out_dir) / CHECKPOINTS, resume)


@contextmanager
def tracking(uri: str | None, cfg, shards: Path, manifest: dict, out_dir: Path, rank0_here: bool):
    """The training's Tracker: one MLflow run when MLFLOW_TRACKING_URI was set, else a no-op.

    The run is opened now when rank 0 trains on this node, and ended FINISHED, FAILED or KILLED
    with the training. On a multi-node run it opens with rank 0's first metrics, so only the
    node that hosts rank 0 has one.
    """
    from tasks.train.trainer import NullTracker

    if not uri:
        yield NullTracker()
        return
    from tasks.run.mlflow_runs import TrainingRun
    from tokenmill.console import step

    tags = {
        "tokenmill.task": cfg.task,
        "tokenmill.stages": "train",
        "tokenmill.shards": str(Path(shards).resolve()),
        "tokenmill.tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "tokenmill.out_dir": str(Path(out_dir).resolve()),
    }
    run = TrainingRun(
        cfg.registry.experiment, f"{Path(shards).resolve().parent.name}-{cfg.preset}", cfg.model_dump(), tags
    )
    if rank0_here:
        step(f"tracking in MLflow run {run.open()} (experiment {cfg.registry.experiment})")
    try:
        yield run
    except KeyboardInterrupt:
        run.close("KILLED")
        raise
    except BaseException:
        run.close("FAILED")
        raise
    run.close("FINISHED")


def run(shards, manifest, cfg, out_dir, resume, warm, earlier, nnodes, rdzv_endpoint, rdzv_id, tracker):
    from tasks.train.launch import Topology
    from tasks.train.progress import train_with_progress

    topology = Topology(cfg.train.nproc_per_node, nnodes, rdzv_endpoint, rdzv_id)
    return train_with_progress(shards, manifest, cfg, out_dir, tracker, resume, warm, earlier, topology)


def report(result, out_dir: Path, mlflow_run_id: str | None = None) -> dict:
    from tokenmill.console import console

    if result is None:
        console.print("this node's ranks are done; rank 0 runs on another node and writes the results there")
        return {"out_dir": str(out_dir), "rank0_here": False, "mlflow_run_id": None}
    summary = {
        "final_loss": result.final_loss,
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "seconds": result.seconds,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "weights": str(result.weights),
        "weights_sha256": result.weights_sha256,
        "gpt_config": result.gpt_config,
        "resumed_from": result.resumed_from,
        "out_dir": str(out_dir),
        "head": result.head,
        "mlflow_run_id": mlflow_run_id,
    }
    console.print(
        f"[bold green]done[/]  {result.steps} steps, loss {result.final_loss:.4f}, "
        f"{result.tokens_per_second:,.0f} tokens/s",
        soft_wrap=True,
    )
    console.print(f"  weights     {result.weights}", soft_wrap=True)
    console.print(f"  checkpoint  {result.checkpoint}", soft_wrap=True)
    console.print(f"  sha256      {result.weights_sha256}", soft_wrap=True)
    if mlflow_run_id:
        console.print(f"  mlflow run  {mlflow_run_id}", soft_wrap=True)
    return summary


def main() -> None:
    """This one command on its own, without the rest of the CLI (the tests run it with Prefect and
    MLflow made unimportable, as on a bare GPU node)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("train")(train)
    app()
