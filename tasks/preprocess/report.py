"""What the preprocessing stage shows a person: a progress bar while encoding, a summary at the end.

Everything goes to stderr (see tokenmill/console.py); stdout stays free for results.
"""

from __future__ import annotations

import time

from rich.progress import TextColumn

from tasks.core.spec import task_spec
from tokenmill.console import console, progress


def encode_progress(futures: list, nbytes: dict[int, int], label: str = "encoding") -> list:
    """Results of the encode futures as they finish, with partitions done, MB/s, tokens/s and ETA."""
    from distributed import as_completed

    results = []
    started = time.time()
    done_bytes = tokens = 0
    with progress(TextColumn("{task.fields[rate]}")) as bar:
        job = bar.add_task(label, total=len(futures), rate="")
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            done_bytes += nbytes[result.index]
            tokens += result.stats["tokens"]
            elapsed = max(time.time() - started, 1e-6)
            bar.update(
                job, advance=1, rate=f"{done_bytes / elapsed / 1e6:.1f} MB/s {tokens / elapsed / 1e3:.0f}k tok/s"
            )
    return results


def summarize(manifest: dict) -> None:
    """A few lines on stderr about what preprocessing made, for the manifest's task."""
    (summarize_labelled if task_spec(manifest.get("task")).labelled else summarize_tokens)(manifest)


def summarize_tokens(manifest: dict) -> None:
    """Documents in and out, what was dropped and why, tokens, reuse and time."""
    s = manifest["stats"]
    say = lambda line: console.print(line, soft_wrap=True, highlight=False)  # noqa: E731
    say(
        f"[bold green]preprocessed[/] {manifest['corpus']['name']}: {s.get('docs_in', 0)} documents in, "
        f"{s.get('docs_out', 0)} out ({s.get('docs_train', 0)} train, {s.get('docs_val', 0)} val), "
        f"{s.get('duplicates', 0)} duplicates, {s.get('near_duplicates', 0)} near-duplicates"
    )
    say(
        f"  tokens     {s.get('tokens', 0):,} ({s.get('bytes_per_token', 0)} bytes/token), "
        f"{sum(x['rows'] for x in manifest['shards']):,} rows of {manifest['row_len']}"
    )
    say(
        f"  partitions {s.get('partitions', 0)} ({s.get('partitions_reused', 0)} reused, "
        f"{s.get('partitions_repacked', 0)} repacked without cross-partition duplicates), {s.get('seconds', 0)} s"
    )
    if manifest.get("dropped"):
        say(
            "  dropped    "
            + ", ".join(f"{r} {n['docs']:,} ({_size(n['bytes'])})" for r, n in manifest["dropped"].items())
            + " (samples in dropped/; --explain-drop N shows them)"
        )
    for reason, text in manifest.get("problems", {}).items():
        say(f"  [yellow]{reason}[/] {text}")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def summarize_labelled(manifest: dict) -> None:
    """Documents in and out, the classes with their train/val counts, truncation."""
    s = manifest["stats"]
    say = lambda line: console.print(line, soft_wrap=True, highlight=False)  # noqa: E731
    say(
        f"[bold green]preprocessed[/] {manifest['corpus']['name']} for classification: "
        f"{s.get('docs_in', 0)} documents in, "
        f"{s.get('docs_out', 0)} out ({s.get('docs_train', 0)} train, {s.get('docs_val', 0)} val), "
        f"{s.get('duplicates', 0)} duplicates"
    )
    train, val = manifest["label_counts"]["train"], manifest["label_counts"]["val"]
    say(f"  labels     {len(manifest['labels'])}: " + ", ".join(f"{n} {train[n]}/{val[n]}" for n in manifest["labels"]))
    say(
        f"  tokens     {s.get('tokens', 0):,} in rows of {manifest['row_len']}; {s.get('docs_truncated', 0)} documents "
        f"truncated ({s.get('tokens_truncated', 0):,} tokens cut)"
    )
    for reason, text in manifest.get("problems", {}).items():
        say(f"  [yellow]{reason}[/] {text}")
