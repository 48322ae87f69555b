"""Bad input: one line on stderr naming the problem and the fix, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest


def tokenmill(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "TOKENMILL_HOME": str(home), "HOME": str(home.parent)}
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "no-such-corpus"], "unknown corpus 'no-such-corpus'"),
        (["run", "--preset", "huge"], "unknown preset 'huge'"),
        (["run", "--catalog", "/nonexistent/catalog.yaml"], "catalog file not found"),
        (["run", "--set", "train.max_steps=-3"], "train.max_steps"),
        (["run", "--set", "train.no_such_field=1"], "train.no_such_field"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
    home = tmp_path / "state"
    result = tokenmill(*args, home=home)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not home.exists()  # nothing half-written


def test_malformed_catalog_is_named(tmp_path):
    bad = tmp_path / "catalog.yaml"
    bad.write_text("corpora:\n  x: [unclosed\n")
    result = tokenmill("run", "x", "--catalog", str(bad), home=tmp_path / "state")
    assert result.returncode == 2
    assert f"catalog {bad} is not valid YAML" in result.stderr
    assert not (tmp_path / "state").exists()
