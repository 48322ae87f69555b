"""One process at a time per output: what overlapping runs on one state dir wait for.

A nightly run and a manual one may start together on the same corpus. Each stage that
writes a content-addressed output (a shard directory, a cached training or evaluation
record, a registered version) holds that output's lock while it checks for a reusable
result and, only if there is none, builds it. The second process waits, then finds the
first one's verified result and reuses it.

    with exclusive(out_dir, f"building {out_dir}"):
        if (cached := reusable(out_dir)) is not None:
            return cached
        return build(out_dir)

A stage that only reads an output another run may have built (training reads its shard
directory) marks it `in_use`: a shared flock on a readers' lock file of its own, so readers
never wait for each other nor hold up a run that checks or builds that output, while
`tokenmill gc` asks `try_exclusive` (the build lock and the readers' lock, without waiting)
and skips whatever is built or read at that moment.

The locks are files under `$TOKENMILL_HOME/locks/` (`filelock`, and flock for readers). The
operating system drops a lock when its process dies, so a killed run never leaves the others
waiting.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from tokenmill.console import step
from tokenmill.errors import TokenmillError
from tokenmill.runtime import state_dir

DEFAULT_TIMEOUT_S = 12 * 3600  # a run may wait for another's whole training on a large preset


def lock_path(target: str | Path) -> Path:
    """The lock file of `target` (a path or any name): readable, and unique by a hash of it."""
    text = str(target)
    readable = re.sub(r"[^\w.-]+", "_", Path(text).name or text)[-60:]
    return state_dir() / "locks" / f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.lock"


def wait_limit() -> float:
    """Seconds to wait for another process: $TOKENMILL_LOCK_TIMEOUT, else 12 hours."""
    return float(os.environ.get("TOKENMILL_LOCK_TIMEOUT") or DEFAULT_TIMEOUT_S)


@contextmanager
def exclusive(target: str | Path, doing: str, timeout: float | None = None) -> Iterator[None]:
    """Hold `target`'s lock for the block; when another process holds it, say so (`doing`
    completes "waiting for another run ...") and wait up to `timeout` seconds for it."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        step(f"waiting for another run {doing}")
        limit = wait_limit() if timeout is None else timeout
        try:
            lock.acquire(timeout=limit)
        except Timeout:
            raise TokenmillError(
                f"gave up after {limit:.0f} s waiting for another run {doing} (lock {path}); let that run finish "
                f"or stop it, or set TOKENMILL_LOCK_TIMEOUT to wait longer"
            ) from None
    try:
        yield
    finally:
        lock.release()


def readers_path(target: str | Path) -> Path:
    """The lock file that readers of `target` share (`in_use`), apart from its build lock, so
    that a reader never holds up another run that only checks or builds `target`."""
    return lock_path(f"{target}#readers")


@contextmanager
def try_exclusive(target: str | Path) -> Iterator[bool]:
    """For removing `target`: hold its build lock and its readers' lock for the block if no
    process builds or reads it now (yields True); yields False at once, never waiting, when one does."""
    build = FileLock(_ready(lock_path(target)))
    try:
        build.acquire(timeout=0)
    except Timeout:
        yield False
        return
    fd = os.open(_ready(readers_path(target)), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor drops the flock
        build.release()


@contextmanager
def in_use(target: str | Path) -> Iterator[None]:
    """Mark `target` as read by this process for the block: a shared flock on its readers' lock.
    Readers share it and never wait for builders; only `try_exclusive` (gc) is kept out."""
    fd = os.open(_ready(readers_path(target)), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def _ready(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
