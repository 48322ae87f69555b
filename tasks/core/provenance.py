"""Which code produced an output: the git commit of this checkout, else tokenmill's version."""

from __future__ import annotations

import subprocess
from pathlib import Path

import tokenmill


def git_commit() -> str | None:
    """HEAD of the checkout tokenmill runs from; None outside a git checkout or without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def code_version() -> str:
    """What cache keys and records name the code by."""
    return git_commit() or tokenmill.__version__
