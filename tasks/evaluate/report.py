"""What a person reads about a model: sample generations, a loss-curve plot, a short report;
for a classifier, a confusion-matrix plot and a report of its per-class metrics."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.core.atomic import write_bytes, write_with
from tasks.modeling.metrics import metric_names

# `complete` lives with the logged pyfunc models, so a served model samples as evaluation does;
# models registered before it moved import it from here.
from tasks.modeling.pyfunc_io import complete


def sample_generations(
    model, sp, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int, seed: int, device: torch.device
) -> list[dict[str, str]]:
    """One seeded sample per prompt."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return [
        {"prompt": p, "completion": complete(model, sp, p, max_new_tokens, temperature, top_k, generator, device)}
        for p in prompts
    ]


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(history: dict[str, list[tuple[int, float]]], dest: Path) -> None:
    """PNG of each named series (train_loss, val_loss_periodic, ...) against step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in history.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, label=name, marker="o" if len(points) < 4 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_with(dest, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def markdown_report(title: str, metrics: dict, samples: list[dict[str, str]], lineage: dict[str, str]) -> str:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for key in ("val_loss", "val_ppl", "val_bpb", "val_unigram_entropy", "val_tokens", "val_bytes"):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.4f} |")
    lines += ["", "## Lineage", ""]
    lines += [f"- {k}: `{v}`" for k, v in lineage.items()]
    lines += ["", "## Sample generations", ""]
    for s in samples:
        lines += [f"**{s['prompt']!r}**", "", "```", s["prompt"] + s["completion"], "```", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, title: str, metrics: dict, samples, lineage, history) -> list[Path]:
    """report.md, and loss_curve.png when there is a history, under out_dir."""
    out_dir = Path(out_dir)
    report = out_dir / "report.md"
    write_bytes(report, markdown_report(title, metrics, samples, lineage).encode())
    paths = [report]
    if any(history.values()):
        plot = out_dir / "loss_curve.png"
        plot_loss_curve(history, plot)
        paths.append(plot)
    return paths


# ---------------------------------------------------------------- classifiers


def plot_confusion_matrix(matrix, labels: list[str], dest: Path) -> None:
    """PNG of the confusion matrix: true label down, predicted across, each cell's count written in."""
    import numpy as np

    plt = pyplot()
    matrix = np.asarray(matrix)
    n = len(labels)
    side = min(16.0, 2.5 + 0.6 * n)
    fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=100)
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title("confusion matrix (val)")
    threshold = matrix.max() / 2 if matrix.size and matrix.max() else 0
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                color="white" if matrix[i, j] > threshold else "black",
                fontsize=9,
            )
    fig.tight_layout()
    write_with(dest, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def cell(text: str) -> str:
    """A label as a markdown table cell: a pipe in it would end the cell."""
    return text.replace("|", "\\|")


def classification_markdown(title: str, metrics: dict, labels: list[str], matrix, lineage: dict[str, str]) -> str:
    """The report of a classifier: headline metrics, per-class precision/recall/support, the matrix."""
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for key in ("accuracy", "macro_f1", "val_loss", "val_rows"):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.4f} |")
    lines += ["", "## Per class", "", "| label | precision | recall | support |", "|---|---|---|---|"]
    for label, name, row in zip(labels, metric_names(labels), matrix):
        lines.append(
            f"| {cell(label)} | {metrics[f'precision.{name}']:.4f} | {metrics[f'recall.{name}']:.4f} "
            f"| {int(sum(row))} |"
        )
    lines += [
        "",
        "## Confusion matrix (rows: true label, columns: predicted)",
        "",
        "| true / predicted | " + " | ".join(map(cell, labels)) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    lines += [f"| {cell(label)} | " + " | ".join(str(int(c)) for c in row) + " |" for label, row in zip(labels, matrix)]
    lines += ["", "## Lineage", ""]
    lines += [f"- {k}: `{v}`" for k, v in lineage.items()]
    return "\n".join(lines) + "\n"


def write_classification_report(
    out_dir: Path, title: str, metrics: dict, labels: list[str], matrix, lineage, history
) -> list[Path]:
    """report.md and confusion_matrix.png, and loss_curve.png when there is a history, under out_dir."""
    out_dir = Path(out_dir)
    report = out_dir / "report.md"
    write_bytes(report, classification_markdown(title, metrics, labels, matrix, lineage).encode())
    plot = out_dir / "confusion_matrix.png"
    plot_confusion_matrix(matrix, labels, plot)
    paths = [report, plot]
    if any(history.values()):
        curve = out_dir / "loss_curve.png"
        plot_loss_curve(history, curve)
        paths.append(curve)
    return paths
