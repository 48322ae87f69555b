"""The data commands of the `tokenmill` command line: the corpus catalog and preprocessing alone.

    tokenmill catalog list [--catalog FILE]
    tokenmill catalog show NAME [--catalog FILE] [--json]
    tokenmill catalog validate [FILE]
    tokenmill preprocess CORPUS [--preset NAME] [--catalog FILE] [--set SECTION.FIELD=VALUE]
                                [--task lm|classify] [--dask-address ADDR] [--workers N] [--json]
                                [--explain-drop N]

`preprocess` runs the preprocessing task's body directly: no Prefect server or flow run is
needed. A labelled corpus (an entry with label_field or label_dirs) becomes labelled shards
for the classify task unless `--task lm` says otherwise. Like every command, a user error
prints one `error:` line and exits with status 2. `--explain-drop N` shows, on stderr, N of
the sampled documents each reason dropped (exact and near-duplicates, each quality filter).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from tokenmill.cli.common import user_errors
from tokenmill.errors import TokenmillError

catalog_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="List, show and validate the corpus catalog.",
)

CATALOG_HELP = "Corpus catalog YAML (default: the bundled one)."


def _echo(line: str) -> None:
    typer.echo(line)


@catalog_app.command("list")
def list_corpora(catalog: Path | None = typer.Option(None, help=CATALOG_HELP)) -> None:
    """The catalog's corpora with their format, license and description."""
    with user_errors():
        from data_catalog.loader import load_catalog

        cat, path = load_catalog(catalog)
        _echo(f"# {path}")
        width = max((len(n) for n in cat.corpora), default=4)
        for name, entry in sorted(cat.corpora.items()):
            _echo(f"{name:<{width}}  {entry.format:<10}  {entry.license:<12}  {entry.description}")


@catalog_app.command("show")
def show(
    name: str = typer.Argument(..., help="A catalog name, or a path, glob or URL."),
    catalog: Path | None = typer.Option(None, help=CATALOG_HELP),
    max_files: int = typer.Option(20, min=0, help="Files to list (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """A corpus resolved to files: the entry, its files, total bytes and fingerprint."""
    with user_errors():
        from data_catalog.loader import resolve_corpus

        corpus = resolve_corpus(name, catalog)
        if as_json:
            _echo(
                json.dumps(
                    {
                        "name": corpus.name,
                        "entry": corpus.entry.model_dump(),
                        "files": [f.model_dump() for f in corpus.files],
                        "bytes": corpus.total_bytes,
                        "fingerprint": corpus.fingerprint,
                    }
                )
            )
            return
        e = corpus.entry
        _echo(f"{corpus.name}: {e.description or '(no description)'}")
        _echo(f"  license      {e.license}")
        _echo(
            f"  format       {e.format}"
            + (f" (text field '{e.text_field}')" if e.format in ("jsonl", "parquet", "auto") else "")
        )
        _echo(f"  task         {e.task}")
        if e.labelled:
            source = f"field '{e.label_field}'" if e.label_field else "one directory per class"
            declared = f"; labels {', '.join(e.labels)}" if e.labels else ""
            _echo(f"  labels       {source}{declared}")
        for section in ("data", "tokenizer"):
            if getattr(e, section):
                _echo(f"  {section:<12} {json.dumps(getattr(e, section), sort_keys=True)}")
        _echo(f"  files        {len(corpus.files)}")
        _echo(f"  bytes        {corpus.total_bytes:,}")
        _echo(f"  fingerprint  {corpus.fingerprint}")
        shown = corpus.files if max_files == 0 else corpus.files[:max_files]
        for f in shown:
            _echo(f"    {f.size:>12,}  {f.path}")
        if len(shown) < len(corpus.files):
            _echo(f"    ... and {len(corpus.files) - len(shown)} more (--max-files 0 lists all)")


@catalog_app.command("validate")
def validate(file: Path | None = typer.Argument(None, help="Catalog YAML (default: the bundled one).")) -> None:
    """Check the catalog's schema, then that every entry's paths resolve to files."""
    with user_errors():
        from data_catalog.loader import load_catalog

        cat, path = load_catalog(file)
        failures = [
            problem for name, entry in sorted(cat.corpora.items()) if (problem := _check_entry(name, entry, cat, path))
        ]
        for problem in failures:
            typer.echo(f"error: {problem}", err=True)
        if failures:
            raise typer.Exit(2)
        _echo(f"ok: {path} ({len(cat.corpora)} corpora)")


def _check_entry(name: str, entry, cat, path: Path) -> str | None:
    """None when the entry resolves to files and its tokenizer reuse names something real, else why not."""
    from data_catalog.loader import resolve_entry

    try:
        corpus = resolve_entry(name, entry, base=path.parent)
    except TokenmillError as exc:
        return f"catalog {path}: {exc}"
    reuse = corpus.entry.tokenizer.get("reuse")
    if reuse and reuse not in cat.corpora and not Path(reuse).exists():
        return (
            f"catalog {path}: entry '{name}', field 'tokenizer.reuse': '{reuse}' is neither a corpus of this "
            "catalog nor an existing file or directory"
        )
    _echo(f"ok  {name}: {len(corpus.files)} files, {corpus.total_bytes / 1e6:.1f} MB")
    return None


def preprocess(
    corpus: str = typer.Argument("python-stdlib", help="A catalog name, or a file, directory, glob or URL."),
    preset: str = typer.Option("default", help="Named preset: tiny, default, small, medium."),
    set_: list[str] = typer.Option([], "--set", help="Override any field: SECTION.FIELD=VALUE (repeatable)."),
    catalog: Path | None = typer.Option(None, help=CATALOG_HELP),
    dask_address: str | None = typer.Option(
        None, help="An existing Dask scheduler (default: $TOKENMILL_DASK_ADDRESS or a LocalCluster)."
    ),
    workers: int | None = typer.Option(
        None, min=1, help="LocalCluster worker processes (default: one per core; never more than the partitions)."
    ),
    task: str | None = typer.Option(
        None, help="lm or classify (default: classify when the corpus has labels, else lm)."
    ),
    as_json: bool = typer.Option(False, "--json", help="End stdout with one JSON object: manifest and stats."),
    explain_drop: int = typer.Option(
        0, "--explain-drop", min=0, help="Show N sampled dropped documents per reason (from <shards>/dropped/)."
    ),
) -> None:
    """Preprocess CORPUS into tokenizer + Arrow shards + manifest.json, and print the manifest path."""
    with user_errors():
        from tasks.core.spec import task_spec
        from tokenmill import runtime

        if task is not None:
            task_spec(task, "--task")

        runtime.configure_env()
        from tasks.run.plan import plan_run

        plan = plan_run(corpus, preset, set_, str(catalog) if catalog else None, task=task)
        runtime.check_dask_address(dask_address)
        runtime.configure()
        from tasks.preprocess.stage import preprocess_corpus

        cfg = plan.config
        manifest_path = preprocess_corpus.fn(
            plan.corpus,
            cfg.tokenizer,
            cfg.data,
            plan.shards_root,
            dask_address or plan.dask_address,
            n_workers=workers,
            classify=cfg.classify,
            task=cfg.task,
        )
        _echo(str(manifest_path))
        if explain_drop:
            from tasks.preprocess.dropped import explain

            for line in explain(Path(manifest_path).parent, explain_drop) or ["nothing was dropped"]:
                typer.echo(line, err=True)
        if as_json:
            manifest = json.loads(Path(manifest_path).read_text())
            out = {
                "manifest": str(manifest_path),
                "task": manifest.get("task", "lm"),
                "corpus": manifest["corpus"],
                "tokenizer": manifest["tokenizer"],
                "shards": len(manifest["shards"]),
                "stats": manifest["stats"],
                "problems": manifest.get("problems", {}),
                "dropped": manifest.get("dropped", {}),
            }
            if "labels" in manifest:
                out.update(labels=manifest["labels"], label_counts=manifest["label_counts"])
            sys.stdout.write(json.dumps(out) + "\n")
