"""Load the declarative corpus catalog and resolve a corpus to a concrete file listing.

Tasks never read the YAML: they receive a `Corpus`, which carries the resolved files and a
fingerprint of them. A name that is not in the catalog but is a path (file, directory or
glob) becomes an ad-hoc corpus with default settings.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import sysconfig
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenmill.errors import TokenmillError

Format = Literal["text", "lines", "paragraphs", "jsonl"]
GLOB_CHARS = set("*?[")


class CorpusEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    license: str = "unknown"
    paths: list[str] = Field(min_length=1)
    exclude: list[str] = []
    format: Format = "text"
    text_field: str = "text"
    data: dict[str, Any] = {}
    tokenizer: dict[str, Any] = {}


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    corpora: dict[str, CorpusEntry]


class SourceFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    mtime_ns: int


class Corpus(BaseModel):
    """A corpus resolved to files: what the preprocessing stage receives."""

    model_config = ConfigDict(frozen=True)

    name: str
    entry: CorpusEntry
    files: list[SourceFile]
    fingerprint: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def default_catalog_path() -> Path:
    return Path(str(resources.files("data_catalog").joinpath("catalog.yaml")))


def load_catalog(path: Path | None = None) -> tuple[Catalog, Path]:
    path = Path(path) if path else default_catalog_path()
    if not path.is_file():
        raise TokenmillError(f"catalog file not found: {path}; pass an existing YAML file with --catalog")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TokenmillError(f"catalog {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("corpora"), dict):
        raise TokenmillError(f"catalog {path} must be a mapping with a 'corpora:' section of named entries")
    try:
        return Catalog.model_validate(raw), path
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = list(err["loc"])
        entry = loc[1] if len(loc) > 1 and loc[0] == "corpora" else "?"
        field = ".".join(str(p) for p in loc[2:]) or "entry"
        msg = "unknown field; check the spelling" if err["type"] == "extra_forbidden" else err["msg"]
        raise TokenmillError(f"catalog {path}: entry '{entry}', field '{field}': {msg}") from None


def resolve_corpus(name_or_path: str, catalog_path: Path | None = None) -> Corpus:
    """A catalog entry by name, or an ad-hoc corpus when the argument is a path or glob."""
    catalog, path = load_catalog(catalog_path)
    if name_or_path in catalog.corpora:
        entry = catalog.corpora[name_or_path]
        return _resolve(name_or_path, entry, base=path.parent)
    if _looks_like_path(name_or_path):
        entry = CorpusEntry(paths=[name_or_path], format=_infer_format(name_or_path))
        name = Path(name_or_path.rstrip("/")).name or "corpus"
        return _resolve(_slug(name), entry, base=Path.cwd())
    known = ", ".join(sorted(catalog.corpora)) or "none"
    raise TokenmillError(
        f"unknown corpus '{name_or_path}': use a catalog name ({known}) or an existing file, directory or glob"
    )


def _resolve(name: str, entry: CorpusEntry, base: Path) -> Corpus:
    files = list_files(entry, base)
    if not files:
        raise TokenmillError(
            f"corpus '{name}' matched no files (paths: {', '.join(entry.paths)}); check its paths"
        )
    return Corpus(name=name, entry=entry, files=files, fingerprint=fingerprint(entry, files))


def list_files(entry: CorpusEntry, base: Path) -> list[SourceFile]:
    """Every regular file the entry's paths match, minus excludes, sorted by path."""
    found: set[str] = set()
    for pattern in entry.paths:
        expanded = os.path.expanduser(pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"]))
        if not os.path.isabs(expanded):
            expanded = str(base / expanded)
        if os.path.isdir(expanded):
            expanded = os.path.join(expanded, "**", "*")
        for match in glob.glob(expanded, recursive=True):
            if os.path.isfile(match):
                found.add(os.path.abspath(match))
    kept = [p for p in found if not any(fnmatch.fnmatch(p, ex) for ex in entry.exclude)]
    files = []
    for p in sorted(kept):
        st = os.stat(p)
        files.append(SourceFile(path=p, size=st.st_size, mtime_ns=st.st_mtime_ns))
    return files


def fingerprint(entry: CorpusEntry, files: list[SourceFile]) -> str:
    """Changes whenever a file is added, removed, resized or touched, or the entry changes."""
    h = hashlib.sha256()
    h.update(json.dumps(entry.model_dump(), sort_keys=True).encode())
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
    return h.hexdigest()


def _looks_like_path(arg: str) -> bool:
    arg = os.path.expanduser(arg)
    return os.path.exists(arg) or bool(GLOB_CHARS & set(arg)) and bool(glob.glob(arg, recursive=True))


def _infer_format(arg: str) -> Format:
    return "jsonl" if arg.endswith((".jsonl", ".jsonl.gz", ".ndjson")) else "text"


def _slug(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return cleaned or "corpus"
