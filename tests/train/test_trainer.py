"""The training loop on tiny synthetic shards: sampling, schedule, accumulation, guards, metrics, CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from tasks.modeling.checkpoint import list_checkpoints, weights_sha256
from tasks.modeling.parallel import pick_device
from tasks.train import trainer
from tasks.train.trainer import BatchSampler, accumulation_steps, lr_factor, peak_flops
from tokenmill.errors import TokenmillError

from train_helpers import ROW_LEN, TINY_TRAIN, VOCAB, Recorder, one_thread, tiny_config, write_corpus  # noqa: F401 (one_thread: autouse)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("shards"))


def test_lr_warms_up_then_decays_to_floor():
    factors = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert factors[0] < factors[5] < factors[9] <= 1.0
    assert max(factors) == pytest.approx(1.0, abs=0.01)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    factors = [lr_factor(s, 10, 100, 0.0, "wsd", decay_fraction=0.4) for s in range(100)]
    assert factors[0] < factors[9] < 1.0
    assert factors[10:60] == [1.0] * 50  # stable until the last 40 steps
    decay = factors[60:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[1] - decay[2] == pytest.approx(decay[-2] - decay[-1])  # linear
    assert decay[-1] == pytest.approx(1 / 40)  # one step short of the floor at the last step
    assert lr_factor(60, 10, 100, 0.2, "wsd", 0.4) == pytest.approx(1.0)
    assert lr_factor(99, 10, 100, 0.2, "wsd", 0.4) == pytest.approx(0.2 + 0.8 / 40)


def test_sampler_is_deterministic_and_covers_an_epoch_without_repeats():
    a, b = BatchSampler(100, 10, seed=7), BatchSampler(100, 10, seed=7)
    epoch = np.concatenate([a.next() for _ in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
    assert np.array_equal(epoch, np.concatenate([b.next() for _ in range(10)]))
    assert a.state_dict() == {"epoch": 0, "offset": 100}
    nxt = a.next()
    assert a.state_dict() == {"epoch": 1, "offset": 10}
    assert not np.array_equal(nxt, epoch[:10])  # reshuffled for the new epoch


def test_sampler_resumes_from_its_state():
    a = BatchSampler(50, 8, seed=1)
    for _ in range(9):
        a.next()
    b = BatchSampler(50, 8, seed=1)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.next(), b.next())


def test_ranks_read_disjoint_parts_of_the_global_batch():
    ranks = [BatchSampler(64, 4, seed=3, rank=r, world=2) for r in range(2)]
    one = BatchSampler(64, 8, seed=3)
    r0, r1 = ranks[0].next(), ranks[1].next()
    assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)
    assert set(r0) | set(r1) == set(one.next())  # together they read the one-process batch


def test_explicit_device_wins_over_auto():
    assert pick_device("cpu").type == "cpu"


def test_tokens_per_step_sets_accumulation_or_names_the_fix():
    t = tiny_config(tokens_per_step=8 * 16 * 4).train
    assert accumulation_steps(t, block_size=16, world=1) == 4
    assert accumulation_steps(t, block_size=16, world=2) == 2
    with pytest.raises(TokenmillError, match=r"train.tokens_per_step=512 .* 8 x 16 x 3 = 384"):
        accumulation_steps(t, block_size=16, world=3)
    with pytest.raises(TokenmillError, match="tokens_per_step or train.grad_accum"):
        tiny_config(tokens_per_step=512, grad_accum=2)


def test_peak_flops_table_is_matched_by_device_name(monkeypatch):
    names = {
        "NVIDIA H100 80GB HBM3": 989.5e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA L4": 121e12,
        "NVIDIA A10G": 70e12,
        "NVIDIA GeForce RTX 4090": 165e12,
        "Tesla T4": None,
    }
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda"), None) == peak, name
    assert peak_flops(torch.device("cuda"), 1e15) == 1e15  # configured wins
    assert peak_flops(torch.device("cpu"), None) is None  # no MFU on CPU unless configured


def test_loss_falls_and_the_weights_load_into_the_model(corpus, tmp_path):
    tracker = Recorder()
    result = trainer.train(corpus, tiny_config(max_steps=20), tmp_path, tracker)
    losses = tracker.series("train_loss")
    assert losses[0] > 0.9 * math.log(VOCAB) and result.final_loss < 0.6 * losses[0]
    model = GPT(GPTConfig(**result.gpt_config))
    state = torch.load(result.weights, weights_only=True)
    model.load_state_dict(state)
    assert result.weights_sha256 == weights_sha256(state)
    assert result.steps == 20 and result.tokens == 20 * 8 * 16 and result.tokens_per_second > 0
    assert result.checkpoint == list_checkpoints(tmp_path / "checkpoints")[-1]
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["gpt"] == result.gpt_config and card["weights_sha256"] == result.weights_sha256


def test_metrics_each_log_interval_with_mfu_only_when_a_peak_is_known(corpus, tmp_path):
    plain, with_peak = Recorder(), Recorder()
    trainer.train(corpus, tiny_config(max_steps=4, log_interval=2, eval_interval=2), tmp_path / "a", plain)
    trainer.train(corpus, tiny_config(max_steps=4, log_interval=2, peak_flops=1e12), tmp_path / "b", with_peak)
    assert [s for s, m in plain.rows if "train_loss" in m] == [2, 4]
    assert set(plain.rows[0][1]) == {"train_loss", "lr", "grad_norm", "tokens_per_s"}
    assert plain.series("val_loss_periodic") and not plain.series("mfu")
    assert all(0 < m < 1 for m in with_peak.series("mfu"))


def test_accumulated_micro_batches_equal_one_big_batch(corpus, tmp_path):
    big, small = Recorder(), Recorder()
    a = trainer.train(corpus, tiny_config(max_steps=3, batch_size=8), tmp_path / "big", big)
    b = trainer.train(corpus, tiny_config(max_steps=3, batch_size=4, tokens_per_step=8 * 16), tmp_path / "acc", small)
    np.testing.assert_allclose(small.series("train_loss"), big.series("train_loss"), rtol=0, atol=1e-5)
    assert a.tokens == b.tokens
    for name, tensor in torch.load(a.weights, weights_only=True).items():
        torch.testing.assert_close(torch.load(b.weights, weights_only=True)[name], tensor, atol=1e-5, rtol=0)


def test_bf16_autocast_on_cpu_when_asked(corpus, tmp_path):
    assert trainer.autocast_for(torch.device("cpu"), "auto") is None
    assert trainer.autocast_for(torch.device("cuda"), "auto") is not None
    result = trainer.train(corpus, tiny_config(max_steps=3, precision="bf16"), tmp_path)
    assert math.isfinite(result.final_loss)
    assert torch.load(result.weights, weights_only=True)["lm_head.weight"].dtype == torch.float32


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        calls["n"] += 1
        return logits, loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TokenmillError, match=r"non-finite loss nan .* at step 5;.*step-00000004\.pt is kept"):
        trainer.train(corpus, tiny_config(max_steps=8, checkpoint_every=2), tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002.pt", "step-00000004.pt"]
    assert not (tmp_path / "model.pt").exists()


def test_existing_checkpoints_need_resume(corpus, tmp_path):
    trainer.train(corpus, tiny_config(max_steps=2), tmp_path)
    with pytest.raises(TokenmillError, match="already holds checkpoints.*resume"):
        trainer.train(corpus, tiny_config(max_steps=2), tmp_path)
    done = trainer.train(corpus, tiny_config(max_steps=2), tmp_path, resume=True)
    assert done.resumed_from == 2 and done.steps == 2  # already finished: nothing to redo


def test_resume_refuses_another_model_shape(corpus, tmp_path):
    trainer.train(corpus, tiny_config(max_steps=2), tmp_path)
    wider = tiny_config(max_steps=4).model_copy(update={"model": tiny_config().model.model_copy(update={"n_embd": 64})})
    with pytest.raises(TokenmillError, match="n_embd 32 \\(source\\) vs 64"):
        trainer.train(corpus, wider, tmp_path, resume=True)


# ---------------------------------------------------------------- tokenmill train


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    # prefect and mlflow are made unimportable: the command must not need them.
    code = (
        "import sys; sys.modules['prefect'] = sys.modules['mlflow'] = None; "
        "from tokenmill.cli.train import main; sys.argv = ['tokenmill-train', *sys.argv[1:]]; main()"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "TOKENMILL_HOME": str(home),
        "TOKENMILL_PROGRESS": "0",
        "HOME": str(home.parent),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_cli_trains_without_prefect_or_mlflow_and_ends_with_one_json_line(corpus, tmp_path):
    args = ["--shards", str(corpus), *TINY_TRAIN, "--checkpoint-every", "2", "--max-steps", "3", "--json"]
    result = cli(*args, home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"final_loss", "steps", "tokens_per_second", "checkpoint", "weights_sha256"} <= set(summary)
    assert summary["steps"] == 3 and Path(summary["checkpoint"]).name == "step-00000003.pt"
    assert Path(summary["out_dir"]) == tmp_path / "home" / "train" / f"{corpus.parent.name}-tiny"


def test_cli_continues_only_with_resume(corpus, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from tokenmill.cli.train import train

    app = typer.Typer()
    app.command("train")(train)  # as tokenmill/cli/ registers it
    app.command("other")(lambda: None)
    monkeypatch.setenv("TOKENMILL_PROGRESS", "0")
    args = ["train", "--shards", str(corpus), *TINY_TRAIN, "--out", str(tmp_path / "run"), "--json"]
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--max-steps", "2"]).exit_code == 0
    again = runner.invoke(app, [*args, "--max-steps", "3"])
    assert again.exit_code == 2 and "continue it with --resume" in again.stderr
    resumed = runner.invoke(app, [*args, "--max-steps", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == 2 and summary["steps"] == 3


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--shards", "/nonexistent/manifest.json"], "shards manifest not found"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--set", "train.batch_size=0"], "train.batch_size"),
        (["--init-from", "/nonexistent/model.pt"], "warm-start weights not found"),
    ],
)
def test_cli_bad_input_is_one_error_line(corpus, tmp_path, args, expected):
    if args[0] != "--shards":
        args = ["--shards", str(corpus), *args]
    result = cli(*args, home=tmp_path / "home")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "home").exists()
