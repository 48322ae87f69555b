import math

import pytest

from tasks.promotion import Candidate, IncomparableModels, decide

SET = "eval-set-a"


def cand(version: str, bpb: float, eval_set: str = SET, generations_ok: bool = True) -> Candidate:
    return Candidate(version, bpb, eval_set, generations_ok)


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


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_metric_is_never_promoted(bad):
    assert not decide(cand("2", bad), None, 0.005).promote
    assert not decide(cand("2", bad), cand("1", 2.0), 0.005).promote


def test_empty_generations_block_promotion():
    assert not decide(cand("2", 1.0, generations_ok=False), cand("1", 2.0), 0.005).promote


def test_different_eval_sets_are_an_error_not_a_comparison():
    with pytest.raises(IncomparableModels, match="different eval sets"):
        decide(cand("2", 1.0, eval_set="b"), cand("1", 2.0), 0.005)
