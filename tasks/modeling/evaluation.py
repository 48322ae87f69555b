"""A model's scores on a frozen eval set: what the evaluation stage returns and the registry gates on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasks.core.spec import task_spec
from tasks.modeling.local_model import LocalModel


@dataclass
class Evaluation:
    model: LocalModel
    metrics: dict[str, float]
    eval_set_sha256: str
    eval_max_rows: int
    weights_sha256: str = ""
    samples: list[dict[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    task: str = "lm"
    confusion: list[list[int]] | None = None  # classify: counts, row = true label, column = predicted

    @property
    def generations_ok(self) -> bool:
        """A task that generates must complete every prompt; a classifier generates nothing."""
        if not task_spec(self.task).generates:
            return True
        return bool(self.samples) and all(s["completion"].strip() for s in self.samples)
