"""The promotion gate: a pure decision on whether a challenger replaces the champion."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    version: str
    val_bpb: float
    eval_set_sha256: str
    generations_ok: bool = True


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


class IncomparableModels(ValueError):
    """The two models were scored on different eval sets."""


def decide(challenger: Candidate, champion: Candidate | None, min_improvement: float) -> Decision:
    """Promote only a sound challenger that beats the champion's val_bpb by `min_improvement` (relative)."""
    if not math.isfinite(challenger.val_bpb):
        return Decision(False, f"val_bpb is {challenger.val_bpb}, not a finite number")
    if not challenger.generations_ok:
        return Decision(False, "sample generations were empty")
    if champion is None:
        return Decision(True, "no champion yet and the absolute checks pass")
    if champion.eval_set_sha256 != challenger.eval_set_sha256:
        raise IncomparableModels(
            f"version {challenger.version} and champion {champion.version} were evaluated on different eval sets"
        )
    needed = champion.val_bpb * (1 - min_improvement)
    if challenger.val_bpb <= needed:
        gain = 1 - challenger.val_bpb / champion.val_bpb
        return Decision(True, f"val_bpb {challenger.val_bpb:.4f} beats champion v{champion.version} ({champion.val_bpb:.4f}) by {gain:.2%}")
    return Decision(
        False,
        f"val_bpb {challenger.val_bpb:.4f} does not beat champion v{champion.version} ({champion.val_bpb:.4f}) "
        f"by the required {min_improvement:.2%} (needs <= {needed:.4f})",
    )
