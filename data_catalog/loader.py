"""Load the declarative corpus catalog and resolve a corpus to a concrete file listing.

Tasks never read the YAML: they receive a `Corpus`, which carries the resolved files and a
fingerprint of them. A name that is not in the catalog but is a path, directory, glob or
URL becomes an ad-hoc corpus with default settings and the format inferred per file.

    from data_catalog.loader import resolve_corpus
    corpus = resolve_corpus("python-stdlib")            # the bundled catalog
    corpus = resolve_corpus("books", Path("my.yaml"))   # another catalog
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_catalog.listing import GLOB_CHARS, SourceFile, expand, is_url, list_sources
from tokenmill.config import DataConfig, TokenizerConfig
from tokenmill.errors import TokenmillError

Format = Literal["auto", "text", "lines", "paragraphs", "jsonl", "parquet"]

__all__ = [
    "Catalog",
    "Corpus",
    "CorpusEntry",
    "SourceFile",
    "fingerprint",
    "list_files",
    "load_catalog",
    "resolve_corpus",
]


class CorpusEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    license: str = "unknown"
    paths: list[str] = Field(min_length=1)
    exclude: list[str] = []
    format: Format = "text"
    text_field: str = Field("text", min_length=1, description="the JSON Lines field or Parquet column of the text")
    data: dict[str, Any] = {}
    tokenizer: dict[str, Any] = {}
    label_field: str | None = Field(
        None, min_length=1, description="the JSON Lines field or Parquet column of the label"
    )
    label_dirs: bool = Field(False, description="directory-per-class: a file's label is the directory it lies in")
    labels: list[str] | None = Field(None, description="the label set; other labels are counted as unknown and dropped")
    task: Literal["lm", "classify"] | None = Field(
        None, description="default: classify when the entry has labels, else lm"
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _label_names(cls, value: Any) -> Any:
        """Integer labels are named by their decimal string, as they are in the data."""
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @model_validator(mode="after")
    def _label_source(self) -> CorpusEntry:
        if self.label_field and self.label_dirs:
            raise ValueError(
                "set label_field (a field of each record) or label_dirs (one directory per class), not both"
            )
        if self.label_field and self.format not in ("jsonl", "parquet", "auto"):
            raise ValueError(
                f"label_field needs format jsonl, parquet or auto, not {self.format}; "
                "or use label_dirs for one directory per class"
            )
        if self.label_field is not None and self.label_field == self.text_field:
            raise ValueError(
                f"label_field and text_field are both '{self.text_field}'; name the column that holds the label"
            )
        labelled = bool(self.label_field or self.label_dirs)
        if self.labels is not None and not labelled:
            raise ValueError("labels is set but nothing says where a label is; set label_field or label_dirs")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels lists a label twice; list each once")
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("labels must name at least two classes; a classifier needs two")
        if self.task == "classify" and not labelled:
            raise ValueError("task classify needs labels: set label_field or label_dirs")
        if self.task is None:
            object.__setattr__(self, "task", "classify" if labelled else "lm")
        return self

    @property
    def labelled(self) -> bool:
        return bool(self.label_field or self.label_dirs)


# Entry fields added for labelled corpora, and their value on an unlabelled entry: left out
# of the fingerprint at that value, so language-model builds keep their cache keys.
LABEL_DEFAULTS = {"label_field": None, "label_dirs": False, "labels": None, "task": "lm"}


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    corpora: dict[str, CorpusEntry]


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
    """The validated catalog and its path; every problem is one line naming file, entry and field."""
    path = Path(path) if path else default_catalog_path()
    if not path.is_file():
        raise TokenmillError(f"catalog file not found: {path}; pass an existing YAML file with --catalog")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TokenmillError(f"catalog {path} is not valid YAML{where}; fix the syntax") from None
    except UnicodeDecodeError:
        raise TokenmillError(f"catalog {path} is not UTF-8 text; save it as UTF-8") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("corpora"), dict):
        raise TokenmillError(f"catalog {path} must be a mapping with a 'corpora:' section of named entries")
    try:
        catalog = Catalog.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = list(err["loc"])
        entry = loc[1] if len(loc) > 1 and loc[0] == "corpora" else "?"
        raise TokenmillError(f"catalog {path}: entry '{entry}', field '{_field(loc[2:])}': {_message(err)}") from None
    for name, entry in catalog.corpora.items():
        _check_overrides(path, name, entry)
    return catalog, path


def _check_overrides(path: Path, name: str, entry: CorpusEntry) -> None:
    """The entry's `data:` and `tokenizer:` blocks must be valid config fields with valid values."""
    for section, model in (("data", DataConfig), ("tokenizer", TokenizerConfig)):
        try:
            model.model_validate(getattr(entry, section))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = _field([section, *err["loc"]])
            raise TokenmillError(f"catalog {path}: entry '{name}', field '{field}': {_message(err)}") from None


def _field(loc: list) -> str:
    return ".".join(str(p) for p in loc) or "entry"


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field; check the spelling"
    return err["msg"].removeprefix("Value error, ")


def resolve_corpus(name_or_path: str, catalog_path: Path | None = None, task: str | None = None) -> Corpus:
    """A catalog entry by name, or an ad-hoc corpus when the argument is a path, glob or URL.

    An ad-hoc local directory asked to train a classifier (`task="classify"`) is read as one
    subdirectory per class, as `label_dirs: true` reads it."""
    catalog, path = load_catalog(catalog_path)
    if name_or_path in catalog.corpora:
        return resolve_entry(name_or_path, catalog.corpora[name_or_path], base=path.parent)
    if _looks_like_path(name_or_path):
        by_dirs = task == "classify" and not is_url(name_or_path) and os.path.isdir(os.path.expanduser(name_or_path))
        entry = CorpusEntry(paths=[name_or_path], format="auto", label_dirs=by_dirs)
        name = name_or_path.rstrip("/").rsplit("/", 1)[-1] or "corpus"
        return resolve_entry(_slug(name), entry, base=Path.cwd())
    known = ", ".join(sorted(catalog.corpora)) or "none"
    raise TokenmillError(
        f"unknown corpus '{name_or_path}': use a catalog name ({known}) or an existing file, directory, glob or URL"
    )


def resolve_entry(name: str, entry: CorpusEntry, base: Path) -> Corpus:
    entry = _absolute_reuse(entry, base)
    files = list_sources(entry.paths, entry.exclude, base, where=f"corpus '{name}'", label_dirs=entry.label_dirs)
    if not files:
        raise TokenmillError(
            f"corpus '{name}' matched no files (paths: {', '.join(entry.paths)}); check its paths and exclude"
        )
    return Corpus(name=name, entry=entry, files=files, fingerprint=fingerprint(entry, files))


def _absolute_reuse(entry: CorpusEntry, base: Path) -> CorpusEntry:
    """A `tokenizer.reuse` path relative to the catalog is made absolute; a corpus name stays."""
    reuse = entry.tokenizer.get("reuse")
    if not isinstance(reuse, str) or is_url(reuse) or os.path.isabs(reuse):
        return entry
    candidate = expand(reuse, base)
    if not os.path.exists(candidate):
        return entry
    return entry.model_copy(update={"tokenizer": {**entry.tokenizer, "reuse": candidate}})


def list_files(entry: CorpusEntry, base: Path) -> list[SourceFile]:
    """Every file the entry's paths match, minus excludes, sorted by path."""
    return list_sources(entry.paths, entry.exclude, base, where="corpus", label_dirs=entry.label_dirs)


def fingerprint(entry: CorpusEntry, files: list[SourceFile]) -> str:
    """Changes whenever a file is added, removed, resized, touched or re-tagged, or the entry changes."""
    h = hashlib.sha256()
    described = {k: v for k, v in entry.model_dump().items() if k not in LABEL_DEFAULTS or v != LABEL_DEFAULTS[k]}
    h.update(json.dumps(described, sort_keys=True).encode())
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\0{f.etag}\n".encode())
    return h.hexdigest()


def _looks_like_path(arg: str) -> bool:
    if is_url(arg):
        return True
    arg = os.path.expanduser(arg)
    return os.path.exists(arg) or bool(GLOB_CHARS & set(arg)) and bool(glob.glob(arg, recursive=True))


def _slug(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return cleaned or "corpus"
