"""Two CPU ranks (gloo, launched through torchrun) train exactly like one process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.train import trainer
from tasks.train.launch import Topology, follow, run_training, torchrun_command
from tokenmill.errors import TokenmillError

from train_helpers import Recorder, one_thread, tiny_config, write_corpus  # noqa: F401 (one_thread: autouse)

pytestmark = pytest.mark.e2e  # gloo ranks in subprocesses: left out of make test-fast


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    tracker = Recorder()
    result = trainer.train(corpus, tiny_config(max_steps=4, batch_size=8), tmp_path_factory.mktemp("one"), tracker)
    return result, tracker.series("train_loss")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(corpus, one_process, tmp_path, mode):
    reference, reference_losses = one_process
    tracker, progress = Recorder(), []
    # 4 rows per rank x 2 ranks: the one-process run's global batch of 8, in its order.
    result = run_training(
        corpus,
        tiny_config(max_steps=4, batch_size=4, parallel=mode),
        tmp_path,
        tracker,
        on_step=lambda done, loss, tps: progress.append(done),
        topology=Topology(nproc_per_node=2),
    )
    np.testing.assert_allclose(tracker.series("train_loss"), reference_losses, rtol=0, atol=1e-5)
    assert progress == [1, 2, 3, 4] and result.tokens == reference.tokens
    ours, theirs = torch.load(result.weights, weights_only=True), torch.load(reference.weights, weights_only=True)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0)


def test_rank_zero_events_reach_the_tracker_progress_and_caller(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text(
        "\n".join(
            json.dumps(e)
            for e in [
                {"kind": "metrics", "metrics": {"train_loss": 2.5}, "step": 1},
                {"kind": "step", "done": 1, "loss": 2.5, "tokens_per_s": 100.0},
                {"kind": "error", "message": "non-finite loss nan at step 2"},
            ]
        )
        + "\n"
        + '{"kind": "step", "do'
    )  # a line still being written is not read
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    tracker, progress = Recorder(), []
    result, error = follow(finished, events, tracker, lambda *args: progress.append(args))
    assert tracker.rows == [(1, {"train_loss": 2.5})] and progress == [(1, 2.5, 100.0)]
    assert result is None and error == "non-finite loss nan at step 2"


def test_torchrun_command_for_one_node_and_for_several(tmp_path):
    spec = tmp_path / "spec.json"
    one = torchrun_command(Topology(nproc_per_node=4), spec)
    assert one[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "4",
        "--standalone",
        "-m",
        "tasks.train.launch",
        str(spec),
    ]
    many = torchrun_command(Topology(8, nnodes=2, rdzv_endpoint="node0:29500", rdzv_id="r1"), spec)
    assert "--standalone" not in many
    assert many[many.index("--rdzv-endpoint") + 1] == "node0:29500" and many[many.index("--nnodes") + 1] == "2"
    with pytest.raises(TokenmillError, match="--rdzv-endpoint"):
        torchrun_command(Topology(8, nnodes=2), spec)


def test_a_user_error_on_the_ranks_reaches_the_caller_as_one_message(corpus, tmp_path):
    # The split holds fewer rows than one batch across two ranks: every rank stops with a
    # TokenmillError, rank 0 reports it through the events file, and each rank exits 2.
    rows = sum(s["rows"] for s in json.loads(corpus.read_text())["shards"] if s["split"] == "train")
    with pytest.raises(TokenmillError, match=f"the train split has {rows} rows, fewer than one batch across ranks"):
        run_training(corpus, tiny_config(max_steps=1, batch_size=rows), tmp_path, topology=Topology(nproc_per_node=2))
    assert not (tmp_path / trainer.WEIGHTS).exists()


def test_a_rank_that_fails_unexpectedly_exits_1_with_its_traceback(tmp_path):
    # A rank ends through tasks.train.launch.exit_rank (os._exit, no interpreter teardown), so its
    # status must still say what happened: 1 and the traceback for an unexpected error.
    bad_spec = tmp_path / "spec.json"
    bad_spec.write_text("{}")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "tasks.train.launch", str(bad_spec)], capture_output=True, text=True, cwd=root
    )
    assert run.returncode == 1 and "KeyError: 'config'" in run.stderr
