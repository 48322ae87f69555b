"""The compute-budget dial (tasks/train/budget.py): the rule it states, and a run that keeps to it."""

import json
import time

import pytest

from tasks.train import budget
from tasks.train.trainer import NullTracker
from tokenmill.config import resolve_config
from tokenmill.errors import TokenmillError

from train_helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("shards"), n_train=512, n_val=32)


def budget_config(seconds: float, **train):
    base = {"budget_s": seconds, "batch_size": 8, "device": "cpu", "eval_interval": 50, "eval_batches": 2}
    return resolve_config("tiny", None, {"train": {**base, **train}})


def fake_speed(monkeypatch, seconds_per_flop: float, overhead: float = 0.0):
    """A device where a token takes overhead + seconds_per_flop * FLOPs, measured without running anything."""

    def probe(data, cfg, gpt_config, device):
        from model import GPT

        return overhead + seconds_per_flop * GPT(gpt_config).flops_per_token()

    monkeypatch.setattr(budget, "probe", probe)


def test_the_deepest_shape_with_enough_tokens_per_parameter_is_chosen(corpus, monkeypatch):
    fake_speed(monkeypatch, 1e-11)
    manifest = json.loads(corpus.read_text())
    plan = budget.plan_budget(corpus, manifest, budget_config(600))
    m, t = plan.cfg.model, plan.cfg.train
    assert (m.n_embd, m.n_head) == (budget.HEAD_DIM * m.n_layer, m.n_layer)
    params = int(plan.params["budget.params"])
    # The rule holds for the chosen depth...
    assert int(plan.params["budget.tokens"]) >= plan.cfg.train.tokens_per_param * params
    deeper = budget.plan_budget(corpus, manifest, budget_config(600, tokens_per_param=0.05)).cfg.model
    assert deeper.n_layer > m.n_layer  # ...and asking fewer tokens per parameter buys depth
    assert t.lr == pytest.approx(1e-2 * (64 / m.n_embd) ** 0.5)  # tiny's lr is set for width 64
    assert t.muon_lr == resolve_config("tiny").train.muon_lr
    assert t.warmup_steps <= t.max_steps // 10 and t.eval_interval <= t.max_steps
    for key in ("shape", "throughput", "max_steps", "lr"):
        assert plan.params[f"budget.reason.{key}"]


def test_more_budget_trains_longer_and_no_smaller(corpus, monkeypatch):
    fake_speed(monkeypatch, 1e-11)
    manifest = json.loads(corpus.read_text())
    short = budget.plan_budget(corpus, manifest, budget_config(300)).cfg
    long = budget.plan_budget(corpus, manifest, budget_config(3000)).cfg
    assert long.model.n_layer >= short.model.n_layer
    assert long.train.max_steps * long.model.n_embd > short.train.max_steps * short.model.n_embd


def test_a_warm_start_keeps_its_shapes_and_plans_only_the_steps(corpus, monkeypatch):
    fake_speed(monkeypatch, 1e-11)
    cfg = budget_config(600)
    plan = budget.plan_budget(corpus, json.loads(corpus.read_text()), cfg, keep_shape=True)
    assert plan.cfg.model == cfg.model
    assert plan.cfg.train.max_steps != cfg.train.max_steps
    assert "warm start" in plan.params["budget.reason.shape"]


def test_a_budget_too_small_for_ten_steps_is_a_clear_error(corpus, monkeypatch):
    fake_speed(monkeypatch, 1e-6, overhead=1e-3)
    with pytest.raises(TokenmillError, match=r"a budget of 5 s leaves .* raise --budget"):
        budget.plan_budget(corpus, json.loads(corpus.read_text()), budget_config(5))


@pytest.mark.e2e
def test_a_budgeted_training_ends_within_its_budget(corpus, tmp_path):
    """The issue's check on the tiny preset: the training stage (the probe, the plan and the
    training) ends within 10% of the budget. The probe measures this machine as it is now."""
    from tasks.train.progress import train_with_progress

    seconds = 20.0
    cfg = budget_config(seconds, checkpoint_every=0)
    started = time.perf_counter()
    result = train_with_progress(corpus, json.loads(corpus.read_text()), cfg, tmp_path, NullTracker(), False, None, [])
    elapsed = time.perf_counter() - started
    assert 0.8 * seconds <= elapsed <= 1.1 * seconds, elapsed
    assert result.steps >= 10
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["config"]["train"]["max_steps"] == result.steps  # the resolved plan is what ran


def test_a_resumed_run_keeps_the_plan_of_its_first_attempt(corpus, monkeypatch, tmp_path):
    fake_speed(monkeypatch, 1e-11)
    cfg = budget_config(600)
    manifest = json.loads(corpus.read_text())
    first = budget.plan_budget(corpus, manifest, cfg).cfg
    (tmp_path / "run.json").write_text(json.dumps({"config": first.model_dump()}))

    def no_probe(*args):
        raise AssertionError("a resumed run must not probe again")

    monkeypatch.setattr(budget, "probe", no_probe)
    assert budget.budgeted(corpus, manifest, cfg, tmp_path, True, NullTracker()) == first


def test_the_plan_goes_to_the_tracker_as_params(corpus, monkeypatch, tmp_path):
    fake_speed(monkeypatch, 1e-11)
    logged = {}

    class Params(NullTracker):
        def log_params(self, params):
            logged.update(params)

    cfg = budget.budgeted(corpus, json.loads(corpus.read_text()), budget_config(600), tmp_path, False, Params())
    assert logged["budget.n_layer"] == str(cfg.model.n_layer)
    assert logged["budget.max_steps"] == str(cfg.train.max_steps)
