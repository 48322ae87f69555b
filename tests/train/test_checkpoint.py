"""Checkpoints: what they hold, atomic writes, weights_only loading, exact resume after SIGKILL, warm start."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig
from tasks.modeling import checkpoint
from tasks.modeling.checkpoint import list_checkpoints, load_latest, warm_start, warm_start_source, weights_sha256
from tasks.train import trainer
from tokenmill.errors import TokenmillError

from train_helpers import Recorder, one_thread, tiny_config, write_corpus  # noqa: F401 (one_thread: autouse)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("shards"))


def test_a_checkpoint_holds_the_whole_run_and_loads_with_weights_only(corpus, tmp_path):
    cfg = tiny_config(max_steps=6, checkpoint_every=2, keep_checkpoints=2)
    trainer.train(corpus, cfg, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000004.pt", "step-00000006.pt"]
    payload = torch.load(tmp_path / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert payload["step"] == 4 and payload["config"] == cfg.model_dump()
    assert payload["sampler"] == {"epoch": 0, "offset": 32}  # 4 steps x 8 rows of 64
    assert payload["scheduler"]["last_epoch"] == 4 and payload["optimizer"]["state"]
    assert payload["rng"][0]["torch"].dtype == torch.uint8
    GPT(GPTConfig(**payload["gpt_config"])).load_state_dict(payload["model"])


def test_an_interrupted_write_leaves_the_older_checkpoints_whole(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"format": checkpoint.FORMAT, "step": 1, "w": torch.ones(3)}, keep=2)

    def dies_midway(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, {"format": checkpoint.FORMAT, "step": 2}, keep=2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]  # no partial file, no temp left
    (tmp_path / ".step-00000002.pt.x1y2.tmp").write_bytes(b"left by a SIGKILL")
    path, payload = load_latest(tmp_path)
    assert path.name == "step-00000001.pt" and torch.equal(payload["w"], torch.ones(3))


def test_a_damaged_or_pickled_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, {"format": checkpoint.FORMAT, "step": step}, keep=3)
    torch.save({"format": checkpoint.FORMAT, "step": 3, "evil": Recorder()}, tmp_path / "step-00000003.pt")
    (tmp_path / "step-00000002.pt").write_bytes((tmp_path / "step-00000002.pt").read_bytes()[:40])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        path, payload = load_latest(tmp_path)
    assert path.name == "step-00000001.pt" and payload["step"] == 1


def test_weights_sha256_depends_on_values_not_on_order():
    a = {"x": torch.arange(4.0), "y": torch.zeros(2, dtype=torch.bfloat16)}
    b = {"y": a["y"].clone(), "x": a["x"].clone()}
    assert weights_sha256(a) == weights_sha256(b)
    b["x"][0] = 1e-7
    assert weights_sha256(a) != weights_sha256(b)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from tasks.train import trainer
    from tokenmill.config import RunConfig

    manifest, config, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)  # as in the test process: the same thread count gives the same float sums

    def on_step(done, loss, tokens_per_s):
        if done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.train(Path(manifest), RunConfig.model_validate_json(config), Path(out), on_step=on_step)
""")


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_a_run_killed_with_sigkill_resumes_to_bitwise_identical_weights(corpus, tmp_path):
    # Dropout on, so the restored RNG state matters as much as the model, optimizer and data position.
    cfg = tiny_config(max_steps=7, checkpoint_every=3, eval_interval=2)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dropout": 0.1})})
    reference = trainer.train(corpus, cfg, tmp_path / "reference")

    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(corpus), cfg.model_dump_json(), str(tmp_path / "run"), "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step-00000003.pt"
    assert not (tmp_path / "run" / "model.pt").exists()

    resumed = trainer.train(corpus, cfg, tmp_path / "run", resume=True)
    assert resumed.resumed_from == 3
    assert resumed.weights_sha256 == reference.weights_sha256
    assert resumed.final_loss == reference.final_loss


# ---------------------------------------------------------------- warm start


@pytest.fixture(scope="module")
def source_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("source")
    return trainer.train(corpus, tiny_config(max_steps=12), out)


def test_warm_start_continues_from_the_source_weights(corpus, source_run, tmp_path):
    scratch, warm = Recorder(), Recorder()
    trainer.train(corpus, tiny_config(max_steps=1), tmp_path / "scratch", scratch)
    source = warm_start_source(source_run.weights)  # shapes and tokenizer from model.json beside it
    trainer.train(corpus, tiny_config(max_steps=1), tmp_path / "warm", warm, warm=source)
    assert warm.series("train_loss")[0] < 0.7 * scratch.series("train_loss")[0]


def test_warm_start_mismatch_names_what_differs(tmp_path, source_run):
    sha = json.loads((source_run.weights.parent / "model.json").read_text())["tokenizer_sha256"]
    source = warm_start_source(source_run.weights)
    other = GPT(GPTConfig(**{**source_run.gpt_config, "vocab_size": 128, "n_embd": 64}))
    with pytest.raises(
        TokenmillError, match=r"tokenizer .* vocab_size 64 \(source\) vs 128 .* n_embd 32 \(source\) vs 64"
    ):
        warm_start(other, source, "f" * 64)
    shallow = GPT(GPTConfig(**{**source_run.gpt_config, "n_layer": 1}))
    lying = checkpoint.WarmStart(source.weights, {**source.gpt_config, "n_layer": 1}, sha)  # the weights have 2
    with pytest.raises(TokenmillError, match="transformer.h.1.attn.c_attn.weight only in the source"):
        warm_start(shallow, lying, sha)
    same = GPT(GPTConfig(**source_run.gpt_config))
    warm_start(same, source, sha)
    assert weights_sha256(same.state_dict()) == source_run.weights_sha256

    bare = tmp_path / "model.pt"
    bare.write_bytes(source_run.weights.read_bytes())
    with pytest.raises(TokenmillError, match="init-tokenizer-sha256"):
        warm_start_source(bare)
    assert warm_start_source(bare, source_run.gpt_config, sha).tokenizer_sha256 == sha


def test_a_retried_train_task_resumes_its_own_run(corpus, tmp_path, monkeypatch):
    from tasks.core.policy import retry_transient
    from tasks.train import stage as train_stage

    assert train_stage.train_model.retries >= 1 and train_stage.train_model.retry_condition_fn is retry_transient
    monkeypatch.setattr(train_stage, "tracker_for", lambda run_id: Recorder())
    monkeypatch.setenv("TOKENMILL_PROGRESS", "0")
    cfg = tiny_config(max_steps=6, checkpoint_every=2)
    reference = trainer.train(corpus, cfg, tmp_path / "reference")

    calls = {"n": 0}
    forward = GPT.forward

    def flaky(self, idx, targets=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ConnectionResetError("lost the shared filesystem")  # transient: Prefect retries it
        return forward(self, idx, targets)

    monkeypatch.setattr(GPT, "forward", flaky)
    with pytest.raises(ConnectionResetError):
        train_stage.train_model.fn(corpus, cfg, tmp_path / "models", "run-1")
    retried = train_stage.train_model.fn(corpus, cfg, tmp_path / "models", "run-1")  # what the retry calls
    assert retried.resumed_from == 4 and retried.weights == tmp_path / "models" / "run-1" / "model.pt"
    assert retried.weights_sha256 == reference.weights_sha256
