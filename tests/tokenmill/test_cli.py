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


def test_the_summary_names_a_champion_only_when_one_exists():
    from tokenmill.cli.pipeline import champion_line

    run = {"model_name": "tokenmill-lm", "model_version": "2"}
    assert champion_line({**run, "champion_version": "2"}) == "models:/tokenmill-lm@champion (this version)"
    assert champion_line({**run, "champion_version": "1"}) == (
        "models:/tokenmill-lm@champion (v1; this version stays challenger)"
    )
    assert champion_line({**run, "champion_version": None}) == (
        "none: no version of tokenmill-lm has passed the gate yet"
    )


def test_version_prints_and_exits(tmp_path):
    from tokenmill import __version__

    out = tokenmill("--version", home=tmp_path / "home")
    assert out.returncode == 0 and out.stdout.strip() == f"tokenmill {__version__}"
    assert not (tmp_path / "home").exists()  # nothing written


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_verbose_shows_the_framework_logs_that_the_default_hides(tmp_path):
    quiet = tokenmill("models", home=tmp_path / "quiet")
    loud = tokenmill("--verbose", "models", home=tmp_path / "loud")
    assert "no registered model" in quiet.stderr and "no registered model" in loud.stderr
    assert "Creating initial MLflow database tables" in loud.stderr  # MLflow's INFO line, on a new state dir
    assert "Creating initial MLflow database tables" not in quiet.stderr
