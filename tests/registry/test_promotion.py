import math

import pytest

from tasks.core.spec import TASKS
from tasks.registry.promotion import Candidate, IncomparableModels, decide

SET = "eval-set-a"


def cand(version: str, bpb: float, eval_set: str = SET, generations_ok: bool = True) -> Candidate:
    return Candidate(version, bpb, eval_set, generations_ok, "val_bpb")


def clf(version: str, macro_f1: float, eval_set: str = SET) -> Candidate:
    return Candidate(version, macro_f1, eval_set, True, "macro_f1")


def test_each_task_has_its_gate_metric_and_direction():
    assert (TASKS["lm"].gate.metric, TASKS["lm"].gate.higher_is_better) == ("val_bpb", False)
    assert (TASKS["classify"].gate.metric, TASKS["classify"].gate.higher_is_better) == ("macro_f1", True)


def test_first_sound_model_is_promoted():
    d = decide(cand("1", 2.0), None, 0.005)
    assert d.promote and "no champion" in d.reason


def test_clearly_better_challenger_is_promoted():
    d = decide(cand("2", 1.90), cand("1", 2.0), 0.005)
    assert d.promote and "5.00%" in d.reason


def test_worse_challenger_is_kept_back():
    d = decide(cand("2", 2.10), cand("1", 2.0), 0.005)
    assert not d.promote and "does not beat" in d.reason


def test_equal_or_marginal_gain_below_margin_is_kept_back():
    assert not decide(cand("2", 2.0), cand("1", 2.0), 0.005).promote
    assert not decide(cand("2", 1.995), cand("1", 2.0), 0.005).promote  # 0.25% < 0.5%
    assert decide(cand("2", 1.99), cand("1", 2.0), 0.005).promote  # exactly 0.5%
    assert not decide(cand("2", 2.0), cand("1", 2.0), 0.0).promote  # a tie never churns the champion


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_metric_is_never_promoted(bad):
    assert not decide(cand("2", bad), None, 0.005).promote
    assert not decide(cand("2", bad), cand("1", 2.0), 0.005).promote


def test_empty_generations_block_promotion():
    assert not decide(cand("2", 1.0, generations_ok=False), cand("1", 2.0), 0.005).promote


def test_different_eval_sets_are_an_error_not_a_comparison():
    with pytest.raises(IncomparableModels, match="different eval sets"):
        decide(cand("2", 1.0, eval_set="b"), cand("1", 2.0), 0.005)


# A classifier: macro_f1, higher is better.


def test_higher_macro_f1_is_promoted_by_its_relative_gain():
    d = decide(clf("2", 0.90), clf("1", 0.80), 0.005)
    assert d.promote and "macro_f1 0.9000 beats champion v1 (0.8000) by 12.50%" in d.reason


def test_lower_macro_f1_never_replaces_a_better_classifier():
    d = decide(clf("2", 0.70), clf("1", 0.80), 0.005)
    assert not d.promote and "does not beat" in d.reason and ">= 0.8040" in d.reason


def test_equal_or_marginal_macro_f1_is_kept_back():
    assert not decide(clf("2", 0.80), clf("1", 0.80), 0.005).promote
    tie = decide(clf("2", 0.80), clf("1", 0.80), 0.0)
    assert not tie.promote and "needs > 0.8000" in tie.reason
    assert not decide(clf("2", 0.802), clf("1", 0.80), 0.005).promote  # 0.25% < 0.5%
    assert decide(clf("2", 0.8041), clf("1", 0.80), 0.005).promote


def test_any_gain_over_a_zero_macro_f1_champion_counts():
    assert decide(clf("2", 0.1), clf("1", 0.0), 0.005).promote
    assert not decide(clf("2", 0.0), clf("1", 0.0), 0.005).promote


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_macro_f1_is_never_promoted(bad):
    assert not decide(clf("2", bad), None, 0.005).promote
    d = decide(clf("2", bad), clf("1", 0.5), 0.005)
    assert not d.promote and "not a finite number" in d.reason


def test_a_champion_without_a_finite_metric_is_not_silently_replaced():
    d = decide(clf("2", 0.9), clf("1", math.nan), 0.005)
    assert not d.promote and "no finite macro_f1" in d.reason


def test_classifiers_on_different_eval_sets_are_not_compared():
    with pytest.raises(IncomparableModels, match="different eval sets"):
        decide(clf("2", 0.99, eval_set="b"), clf("1", 0.5), 0.005)


def test_models_gated_on_different_metrics_are_not_compared():
    with pytest.raises(IncomparableModels, match="gated on macro_f1"):
        decide(clf("2", 0.9), cand("1", 2.0), 0.005)


def test_an_unknown_gate_metric_is_refused():
    with pytest.raises(ValueError, match="no promotion gate for metric 'accuracy'"):
        decide(Candidate("2", 0.9, SET, True, "accuracy"), None, 0.005)


def test_a_warm_start_with_other_shapes_stops_before_any_work(tmp_path, monkeypatch):
    from tasks.modeling.local_model import LocalModel
    from tasks.registry import model_store
    from tasks.registry import versions as registry
    from tokenmill.config import ModelConfig
    from tokenmill.errors import TokenmillError

    source = {"vocab_size": 1024, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128}
    fetched = LocalModel(tmp_path / "model.pt", tmp_path / "tokenizer.model", source, "ab" * 32)
    monkeypatch.setattr(model_store, "download_model", lambda uri, dst: fetched)
    same = ModelConfig(n_layer=4, n_head=4, n_embd=128, dropout=0.1)
    assert registry.start_model("models:/lm/1", False, "lm", tmp_path, same)[0] is fetched
    with pytest.raises(TokenmillError, match=r"n_layer 4 \(source\) vs 2 \(this run\).*--set model.n_layer=4"):
        registry.start_model("models:/lm/1", False, "lm", tmp_path, ModelConfig(n_layer=2, n_head=2, n_embd=64))
