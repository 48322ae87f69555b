"""The promotion gate: a pure decision on whether a challenger replaces the champion.

Each task has one gate metric (`tasks.core.spec`): a language model is judged by `val_bpb`
(lower is better), a classifier by `macro_f1` (higher is better). Two models are compared only on the same
gate metric and the same frozen eval set, and the challenger must be strictly better by
at least `min_improvement`, relative to the champion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tasks.core.spec import spec_for_gate


@dataclass(frozen=True)
class Candidate:
    version: str
    value: float  # of `metric`, on the eval set below
    eval_set_sha256: str
    sound: bool = True  # the task's absolute checks (a language model's sample generations are not empty)
    metric: str = "val_bpb"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


class IncomparableModels(ValueError):
    """The two models were scored on different eval sets or by different gate metrics."""


def decide(challenger: Candidate, champion: Candidate | None, min_improvement: float) -> Decision:
    """Promote only a sound challenger that beats the champion's gate metric by `min_improvement` (relative)."""
    gate, name = spec_for_gate(challenger.metric).gate, challenger.metric
    if not math.isfinite(challenger.value):
        return Decision(False, f"{name} is {challenger.value}, not a finite number")
    if not challenger.sound:
        return Decision(False, "sample generations were empty")
    if champion is None:
        return Decision(True, "no champion yet and the absolute checks pass")
    if champion.metric != challenger.metric:
        raise IncomparableModels(
            f"version {challenger.version} is gated on {challenger.metric} "
            f"and champion {champion.version} on {champion.metric}"
        )
    if champion.eval_set_sha256 != challenger.eval_set_sha256:
        raise IncomparableModels(
            f"version {challenger.version} and champion {champion.version} were evaluated on different eval sets"
        )
    if not math.isfinite(champion.value):
        return Decision(False, f"champion v{champion.version} has no finite {name} to compare with; promote by hand")
    new, old = challenger.value, champion.value
    if gate.higher_is_better:  # a tie never churns the champion, so the gain must also be strictly positive
        needed, gain = old * (1 + min_improvement), (new / old - 1 if old else math.inf)
        passes, bound = new > old and new >= needed, (">=", ">")
    else:
        needed, gain = old * (1 - min_improvement), 1 - new / old
        passes, bound = new < old and new <= needed, ("<=", "<")
    if passes:
        return Decision(True, f"{name} {new:.4f} beats champion v{champion.version} ({old:.4f}) by {gain:.2%}")
    need = f"{bound[0]} {needed:.4f}" if needed != old else f"{bound[1]} {old:.4f}"
    return Decision(
        False,
        f"{name} {new:.4f} does not beat champion v{champion.version} ({old:.4f}) "
        f"by the required {min_improvement:.2%} (needs {need})",
    )
