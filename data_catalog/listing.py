"""List the files a corpus entry's paths match: local paths, directories, globs and fsspec URLs.

A local path stays a plain absolute path; anything with a scheme (`s3://`, `gs://`,
`https://`, `memory://`, ...) is listed through fsspec and kept as a URL, so workers open it
the same way. `file://` URLs are turned into local paths. Credentials come from the
environment, as each fsspec backend reads them; they never appear in the catalog.
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
    """One input file. `etag` is set for remote files whose store provides one."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    mtime_ns: int = 0
    etag: str = ""


def is_url(path: str) -> bool:
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1


def expand(pattern: str, base: Path) -> str:
    """`{stdlib}` and `~` expanded; a relative local path made absolute against `base`."""
    pattern = pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    if pattern.startswith("file://"):
        pattern = pattern[len("file://"):]
    if is_url(pattern):
        return pattern
    pattern = os.path.expanduser(pattern)
    return pattern if os.path.isabs(pattern) else str(base / pattern)


def list_pattern(pattern: str, base: Path, where: str) -> list[SourceFile]:
    """The files one `paths` item matches. A plain path that does not exist is an error."""
    expanded = expand(pattern, base)
    if is_url(expanded):
        return _list_url(expanded, where)
    return _list_local(expanded, pattern, where)


def list_sources(patterns: list[str], exclude: list[str], base: Path, where: str) -> list[SourceFile]:
    """Every file the patterns match, minus excludes, each once, sorted by path."""
    found: dict[str, SourceFile] = {}
    for pattern in patterns:
        for f in list_pattern(pattern, base, where):
            found[f.path] = f
    return [f for p, f in sorted(found.items()) if not any(fnmatch.fnmatch(p, ex) for ex in exclude)]


def _list_local(expanded: str, pattern: str, where: str) -> list[SourceFile]:
    if GLOB_CHARS & set(expanded):
        matches = glob.glob(expanded, recursive=True)
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
        raise TokenmillError(f"{where}: cannot reach '{url}' ({_first_line(exc)}); check the URL and credentials") from None
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
