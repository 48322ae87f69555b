"""List the files a corpus entry's paths match: local paths, directories, globs and fsspec URLs.

A local path stays a plain absolute path; anything with a scheme (`s3://`, `gs://`,
`https://`, `memory://`, ...) is listed through fsspec and kept as a URL, so workers open it
the same way. `file://` URLs are turned into local paths. Credentials come from the
environment, as each fsspec backend reads them; they never appear in the catalog.

With `label_dirs` (directory-per-class corpora) each file also gets a label: the first
directory below the pattern's static root (its part before the first glob character), or
the root's own name for a file directly inside it. So `data/*/*.txt` labels
`data/pos/a.txt` "pos", and `data/pos` (a plain directory) labels its files "pos" as well.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import sysconfig
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tokenmill.errors import TokenmillError

GLOB_CHARS = set("*?[")


class SourceFile(BaseModel):
    """One input file. `etag` is set for remote files whose store provides one; `label` for
    files of a directory-per-class corpus."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    mtime_ns: int = 0
    etag: str = ""
    label: str | None = None


def is_url(path: str) -> bool:
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1


def expand(pattern: str, base: Path) -> str:
    """`{stdlib}` and `~` expanded; a relative local path made absolute against `base`."""
    pattern = pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    if pattern.startswith("file://"):
        pattern = pattern[len("file://") :]
    if is_url(pattern):
        return pattern
    pattern = os.path.expanduser(pattern)
    return pattern if os.path.isabs(pattern) else str(base / pattern)


def list_pattern(pattern: str, base: Path, where: str, exclude: list[str] | tuple[str, ...] = ()) -> list[SourceFile]:
    """The files one `paths` item matches. A plain path that does not exist is an error.
    `exclude` only spares walking directories it drops whole; the caller still applies it."""
    expanded = expand(pattern, base)
    if is_url(expanded):
        return _list_url(expanded, where)
    return _list_local(expanded, pattern, where, exclude)


def list_sources(
    patterns: list[str], exclude: list[str], base: Path, where: str, label_dirs: bool = False
) -> list[SourceFile]:
    """Every file the patterns match, minus excludes, each once, sorted by path; with
    `label_dirs`, labelled by the directory it lies in (see the module docstring)."""
    found: dict[str, SourceFile] = {}
    for pattern in patterns:
        root = static_root(expand(pattern, base)) if label_dirs else ""
        for f in list_pattern(pattern, base, where, exclude):
            found[f.path] = f.model_copy(update={"label": dir_label(f.path, root)}) if label_dirs else f
    return [f for p, f in sorted(found.items()) if not any(fnmatch.fnmatch(p, ex) for ex in exclude)]


def static_root(expanded: str) -> str:
    """The directory a pattern starts from: its components before the first glob character;
    a plain file's parent; a plain directory itself."""
    parts = expanded.rstrip("/").split("/")
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            return "/".join(parts[:i])
    if not is_url(expanded) and os.path.isfile(expanded):
        return os.path.dirname(expanded)
    return "/".join(parts)


def dir_label(path: str, root: str) -> str | None:
    """The first directory below `root` on the way to `path`, or the root's name for a file in it."""
    if is_url(root) and not is_url(path):  # a listed file:// root was turned into a local path
        root = root.split("://", 1)[1]
    rel = path[len(root) :].lstrip("/") if path.startswith(root.rstrip("/") + "/") else ""
    parts = rel.split("/")
    if len(parts) > 1:
        return parts[0]
    return root.rstrip("/").rsplit("/", 1)[-1] or None


def _list_local(expanded: str, pattern: str, where: str, exclude=()) -> list[SourceFile]:
    if GLOB_CHARS & set(expanded):
        matches = _glob(expanded, exclude)
    elif os.path.isdir(expanded):
        matches = glob.glob(os.path.join(glob.escape(expanded), "**", "*"), recursive=True)
    elif os.path.exists(expanded):
        matches = [expanded]
    else:
        raise TokenmillError(f"{where}: path '{pattern}' does not exist ({expanded}); fix or remove it")
    files = []
    for match in matches:
        if os.path.isfile(match):
            st = os.stat(match)
            files.append(SourceFile(path=os.path.abspath(match), size=st.st_size, mtime_ns=st.st_mtime_ns))
    return files


def _glob(expanded: str, exclude) -> list[str]:
    """`glob.glob(expanded, recursive=True)` for a `root/**/rest` pattern, without walking the
    directories right below `root` that an exclude pattern drops whole: the standard library's
    `*/site-packages/*` holds most of the files under it. Other patterns go to glob as they are."""
    root, sep, rest = expanded.partition("/**/")
    if not sep or GLOB_CHARS & set(root) or not os.path.isdir(root):
        return glob.glob(expanded, recursive=True)
    matches = glob.glob(os.path.join(glob.escape(root), rest), recursive=True)  # `**` as no directory
    with os.scandir(root) as entries:
        subdirs = [e.path for e in entries if not e.name.startswith(".") and e.is_dir()]  # as glob's `**`
    for sub in subdirs:
        if not any(ex.endswith("*") and fnmatch.fnmatch(sub + "/", ex) for ex in exclude):
            matches += glob.glob(os.path.join(glob.escape(sub), "**", rest), recursive=True)
    return matches


def _list_url(url: str, where: str) -> list[SourceFile]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        scheme = url.partition("://")[0]
        raise TokenmillError(
            f"{where}: cannot open '{url}' ({_first_line(exc)}); install the fsspec backend for '{scheme}://'"
        ) from None
    try:
        if GLOB_CHARS & set(root):
            infos = fs.glob(root, detail=True).values()
        elif fs.isdir(root):
            infos = fs.find(root, detail=True).values()
        elif fs.exists(root):
            infos = [fs.info(root)]
        else:
            raise TokenmillError(f"{where}: '{url}' does not exist; check the URL")
    except TokenmillError:
        raise
    except Exception as exc:  # network, permission and backend errors all reach the user the same way
        raise TokenmillError(
            f"{where}: cannot reach '{url}' ({_first_line(exc)}); check the URL and credentials"
        ) from None
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return [_url_file(fs, protocol, info) for info in infos if info.get("type") == "file"]


def _url_file(fs, protocol: str, info: dict) -> SourceFile:
    path = fs.unstrip_protocol(info["name"]) if hasattr(fs, "unstrip_protocol") else f"{protocol}://{info['name']}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created") or 0
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    try:
        mtime_ns = int(float(mtime) * 1e9)
    except (TypeError, ValueError):
        mtime_ns = 0
    etag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "").strip('"')
    return SourceFile(path=path, size=int(info.get("size") or 0), mtime_ns=mtime_ns, etag=etag)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
