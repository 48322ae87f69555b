"""Run training in this process, or on several ranks through torchrun.

`run_training` is what the CLI and the Prefect task call. With one process per node and
one node it calls `trainer.train` here. Otherwise it writes a spec, starts
`python -m torch.distributed.run ... -m tasks.train.launch SPEC` and waits; each rank runs
`main()` below. Rank 0 writes its metrics, progress and result as JSON lines to an events
file, which this process tails into the caller's tracker and progress bar, so the ranks
never import a tracking library and stdout stays clean.

    python -m tasks.train.launch SPEC.json          # what torchrun starts on every rank
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.modeling import checkpoint
from tasks.modeling.checkpoint import WarmStart
from tasks.train import trainer
from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive


@dataclass(frozen=True)
class Topology:
    """Where the ranks run: torchrun's --nproc-per-node, --nnodes and rendezvous."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # host:port of the rendezvous, needed when nnodes > 1
    rdzv_id: str = "tokenmill"

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1


def torchrun_command(topology: Topology, spec: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(topology.nproc_per_node)]
    if topology.nnodes == 1 and not topology.rdzv_endpoint:
        cmd.append("--standalone")  # a free local port, no rendezvous server
    else:
        if not topology.rdzv_endpoint:
            raise TokenmillError(f"--nnodes {topology.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += [
            "--nnodes",
            str(topology.nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            topology.rdzv_endpoint,
            "--rdzv-id",
            topology.rdzv_id,
        ]
    return cmd + ["-m", "tasks.train.launch", str(spec)]


def run_training(
    manifest_path: Path,
    cfg,
    out_dir: Path,
    tracker: trainer.Tracker | None = None,
    on_step: trainer.OnStep | None = None,
    *,
    resume: bool = False,
    warm: WarmStart | None = None,
    topology: Topology | None = None,
) -> trainer.TrainResult | None:
    """Train here or under torchrun; None only on a node whose ranks do not include rank 0.
    One process at a time trains into `out_dir`: an overlapping one waits, then, unless it
    resumes, stops on the checkpoints the first one left instead of mixing its own in."""
    topology = topology or Topology(nproc_per_node=cfg.train.nproc_per_node)
    tracker = tracker or trainer.NullTracker()
    if topology.nnodes > 1:  # every node runs this with the same out_dir: a shared lock would keep them apart
        return launch(manifest_path, cfg, out_dir, tracker, on_step, resume, warm, topology)
    with exclusive(Path(out_dir).resolve(), f"training into {out_dir}"):
        checkpoint.earlier_checkpoints(out_dir, Path(out_dir) / trainer.CHECKPOINTS, resume)
        return launch(manifest_path, cfg, out_dir, tracker, on_step, resume, warm, topology)


def launch(
    manifest_path: Path,
    cfg,
    out_dir: Path,
    tracker: trainer.Tracker,
    on_step: trainer.OnStep | None,
    resume: bool,
    warm: WarmStart | None,
    topology: Topology,
) -> trainer.TrainResult | None:
    if not topology.distributed:
        return trainer.train(manifest_path, cfg, out_dir, tracker, on_step, resume=resume, warm=warm)
    work = Path(out_dir) / ".launch"
    work.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:12]
    spec, events = work / f"spec-{run}.json", work / f"events-{run}.jsonl"
    spec.write_text(
        json.dumps(
            {
                "manifest": str(Path(manifest_path).resolve()),
                "config": cfg.model_dump(),
                "out_dir": str(Path(out_dir).resolve()),
                "resume": resume,
                "warm": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(warm).items()} if warm else None,
                "events": str(events.resolve()),
            }
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    proc = subprocess.Popen(torchrun_command(topology, spec), stdout=2, env=env)  # ranks' prints go to stderr
    try:
        result, error = follow(proc, events, tracker, on_step)
    finally:
        if proc.poll() is None:
            proc.kill()
        spec.unlink(missing_ok=True)
        events.unlink(missing_ok=True)
    if error:
        raise TokenmillError(error)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with status {proc.returncode}; the ranks' output is above")
    return result


def follow(proc: subprocess.Popen, events: Path, tracker, on_step) -> tuple[trainer.TrainResult | None, str | None]:
    """Forward rank 0's events while the ranks run; return its result or error message."""
    result, error, pending, source = None, None, "", None
    while True:
        running = proc.poll() is None
        if source is None and events.exists():
            source = open(events, encoding="utf-8")
        pending += source.read() if source else ""
        *lines, pending = pending.split("\n")  # the last piece may still be being written
        for line in lines:
            event = json.loads(line)
            if event["kind"] == "metrics":
                tracker.log_metrics(event["metrics"], step=event["step"])
            elif event["kind"] == "step" and on_step:
                on_step(event["done"], event["loss"], event["tokens_per_s"])
            elif event["kind"] == "result":
                result = result_from_json(event["result"])
            elif event["kind"] == "error":
                error = event["message"]
        if not running:
            if source:
                source.close()
            return result, error
        time.sleep(0.2)


def result_from_json(d: dict) -> trainer.TrainResult:
    d = dict(d)
    d["weights"] = Path(d["weights"])
    d["checkpoint"] = Path(d["checkpoint"]) if d.get("checkpoint") else None
    return trainer.TrainResult(**d)


class EventWriter:
    """Rank 0's side of `follow`: a Tracker and an on_step callback writing JSON lines."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, **event) -> None:
        self.file.write(json.dumps(event, default=str) + "\n")
        self.file.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.write(kind="metrics", metrics=metrics, step=step)

    def on_step(self, done: int, loss: float, tokens_per_s: float) -> None:
        self.write(kind="step", done=done, loss=loss, tokens_per_s=tokens_per_s)


def main(argv: list[str] | None = None) -> int:
    """One rank of a torchrun launch: read the spec, train, report through the events file."""
    from tasks.modeling import parallel
    from tokenmill.config import RunConfig

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    cfg = RunConfig.model_validate(spec["config"])
    warm = WarmStart(**{**spec["warm"], "weights": Path(spec["warm"]["weights"])}) if spec["warm"] else None
    events = EventWriter(Path(spec["events"])) if parallel.ranks_from_env().main else None
    try:
        result = trainer.train(
            Path(spec["manifest"]),
            cfg,
            Path(spec["out_dir"]),
            events or trainer.NullTracker(),
            events.on_step if events else None,
            resume=spec["resume"],
            warm=warm,
        )
    except TokenmillError as exc:
        if events:
            events.write(kind="error", message=str(exc))
        return 2
    finally:
        parallel.leave_process_group()
    if events:
        events.write(kind="result", result=asdict(result))
    return 0


def exit_rank(code: int) -> None:
    """End this rank without tearing the interpreter down.

    Gloo's worker threads can still be releasing a finished collective's tensors when
    Python finalizes; taking the GIL then ends the thread inside a C++ destructor, and
    the process aborts ("terminate called without an active exception") after its work
    is done, failing a finished run. Everything this rank writes is already durable
    (atomic renames, a flushed events file), so it skips finalization, as the faulting
    teardown cannot be ordered from Python.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # an unexpected error: its traceback, then a failed rank
        traceback.print_exc()
        status = 1
    exit_rank(status)
