"""What a person reads about a model: sample generations, a loss-curve plot, a short report."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.atomic import write_bytes, write_with


@torch.no_grad()
def complete(model, sp, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
             generator: torch.Generator, device: torch.device) -> str:
    """The sampled continuation of `prompt`, cut at the first end-of-document token."""
    eos = sp.eos_id()
    ids = sp.encode(prompt) or [eos]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    new = out[0, len(ids):].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    return sp.decode(new)


def sample_generations(model, sp, prompts: list[str], max_new_tokens: int, temperature: float,
                       top_k: int, seed: int, device: torch.device) -> list[dict[str, str]]:
    """One seeded sample per prompt."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return [
        {"prompt": p, "completion": complete(model, sp, p, max_new_tokens, temperature, top_k, generator, device)}
        for p in prompts
    ]


def generations_ok(samples: list[dict[str, str]]) -> bool:
    return bool(samples) and all(s["completion"].strip() for s in samples)


def plot_loss_curve(history: dict[str, list[tuple[int, float]]], dest: Path) -> None:
    """PNG of each named series (train_loss, val_loss_periodic, ...) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
