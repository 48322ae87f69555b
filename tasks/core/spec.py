"""One small spec per task (language model, classifier): what differs between the two paths.

Each stage looks its task up here instead of branching on the task's name: the shards it
trains on, the gate metric the registry promotes by, the headline metrics every summary shows
(with their units). The registered model's default name is config, not code
(`tokenmill.config.DEFAULT_MODEL_NAMES`). The torch-side pieces (the
network, the evaluator, the report) are looked up by the same name in the stage that owns them:
`tasks.modeling.task_data.TASK_DATA`, `tasks.evaluate.stage.EVALUATORS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.errors import TokenmillError


@dataclass(frozen=True)
class Gate:
    """The one metric the registry promotes by."""

    metric: str
    higher_is_better: bool


@dataclass(frozen=True)
class Headline:
    """A metric every summary shows: its name, how many decimals, what it is measured in, and a
    note formatted from the other metrics (and `classes`, the number of labels)."""

    metric: str
    decimals: int = 4
    unit: str = ""
    note: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    gate: Gate
    headline: tuple[Headline, ...]
    listed: tuple[str, ...]  # the metrics `tokenmill models` lists: the gate's first
    labelled: bool  # trains on labelled documents (one per row) instead of packed token rows
    generates: bool  # writes sample generations, which must not be empty to promote


LM = TaskSpec(
    name="lm",
    description="next-token language model",
    gate=Gate("val_bpb", higher_is_better=False),
    headline=(
        Headline("val_loss", 4, "nats/token", "(unigram baseline {val_unigram_entropy:.4f})"),
        Headline("val_ppl", 2),
        Headline("val_bpb", 4, "bits/byte"),
    ),
    listed=("val_bpb", "val_loss"),
    labelled=False,
    generates=True,
)
CLASSIFY = TaskSpec(
    name="classify",
    description="text classifier",
    gate=Gate("macro_f1", higher_is_better=True),
    headline=(
        Headline("val_loss", 4, "nats/document"),
        Headline("accuracy"),
        Headline("macro_f1", 4, "", "({classes} classes)"),
    ),
    listed=("macro_f1", "accuracy"),
    labelled=True,
    generates=False,
)
TASKS = {spec.name: spec for spec in (LM, CLASSIFY)}
TASK_NAMES = tuple(TASKS)


def task_spec(name: str | None, where: str = "task") -> TaskSpec:
    """The spec of a task name; `None` (a manifest or record older than the classify task) is
    a language model. An unknown name is a user error naming the choices."""
    if name is None:
        return LM
    try:
        return TASKS[name]
    except KeyError:
        raise TokenmillError(f"unknown {where} '{name}': use {' or '.join(TASK_NAMES)}") from None


def spec_for_gate(metric: str) -> TaskSpec:
    """The task whose gate metric this is (a registered version records only the metric)."""
    for spec in TASKS.values():
        if spec.gate.metric == metric:
            return spec
    raise ValueError(
        f"no promotion gate for metric '{metric}': use one of {', '.join(s.gate.metric for s in TASKS.values())}"
    )


def headline_lines(
    spec: TaskSpec, metrics: dict, labels: list | tuple = (), note_sep: str = " "
) -> list[tuple[str, str]]:
    """(name, value with unit and note) of each of the task's headline metrics in `metrics`:
    what the terminal, the run summary and its Prefect artifact show."""
    out = []
    for h in spec.headline:
        if h.metric not in metrics:
            continue
        text = f"{float(metrics[h.metric]):.{h.decimals}f} {h.unit}".rstrip()
        try:
            note = h.note.format(**metrics, classes=len(labels))
        except (KeyError, ValueError):  # a record older than the metric the note names
            note = ""
        out.append((h.metric, f"{text}{note_sep}{note}" if note else text))
    return out
