"""Overlapping runs on one state dir: one builds, the others wait and reuse; nothing twice.

The end-to-end test starts three `tokenmill run` of one corpus at once on a fresh state dir,
as a nightly schedule and a manual trigger may. The unit tests below it check the lock helper
and the registry's create race directly.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive, in_use, try_exclusive


@pytest.fixture
def small_corpus(tmp_path):
    src = Path(sysconfig.get_paths()["stdlib"])
    dst = tmp_path / "corpus"
    for package in ("json", "email", "logging", "asyncio"):
        shutil.copytree(src / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_three_overlapping_runs_build_train_and_register_once(tmp_path, small_corpus):
    from mlflow import MlflowClient

    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(TOKENMILL_HOME=str(state), TOKENMILL_PROGRESS="0")
    cmd = [sys.executable, "-m", "tokenmill.cli", "run", str(small_corpus), "--preset", "tiny", "--max-steps", "20"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    errs = [err for _, err in outs]

    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-3000:] for e in errs)
    assert not [e for e in errs if "Traceback" in e], "\n".join(errs)
    # Each stage ran in exactly one process; the others waited for it and reused its output.
    for work in (
        "training bpe tokenizer",
        "> encoding ",
        "training on cpu",
        "evaluating on the frozen eval set",
        "> registering tokenmill-lm",
    ):
        assert sum(work in e for e in errs) == 1, (work, errs)
    assert sum("waiting for another run" in e for e in errs) >= 1
    assert all("done  tokenmill-lm v1 " in e for e in errs)
    client = MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='tokenmill-lm'")] == ["1"]
    assert len(list((state / "shards").glob("*/manifest.json"))) == 1


def test_a_second_process_waits_then_reuses_what_the_first_built(tmp_path, capsys):
    out = tmp_path / "shards"
    built = []

    def build_once(delay: float) -> str:
        with exclusive(out, f"building {out}"):
            if (out / "manifest.json").exists():
                return "reused"
            time.sleep(delay)
            out.mkdir(exist_ok=True)
            (out / "manifest.json").write_text("{}")
            built.append(1)
            return "built"

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", build_once(0.5)))
    first.start()
    time.sleep(0.1)
    results["second"] = build_once(0)
    first.join()

    assert results == {"first": "built", "second": "reused"} and built == [1]
    assert f"waiting for another run building {out}" in capsys.readouterr().err


def test_waiting_too_long_is_one_clear_error(tmp_path):
    target = tmp_path / "model"
    held, release = threading.Event(), threading.Event()

    def hold():
        with exclusive(target, "training"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        with pytest.raises(
            TokenmillError, match="gave up after 0 s waiting for another run training .*TOKENMILL_LOCK_TIMEOUT"
        ):
            with exclusive(target, "training", timeout=0.2):
                pass
    finally:
        release.set()
        holder.join()
    with exclusive(target, "training", timeout=0.2):  # free again once the holder is done
        pass


def test_a_reader_never_holds_up_a_builder_but_keeps_gc_out(tmp_path):
    shards = tmp_path / "shards" / "corpus-0123456789abcdef"
    with in_use(shards), in_use(shards):  # a run training on the shards, and another one
        with exclusive(shards, "building it", timeout=0.2):  # a third run checking the build: no wait
            pass
        with try_exclusive(shards) as free:
            assert not free  # gc skips it
    with exclusive(shards, "building it"), try_exclusive(shards) as free:
        assert not free  # nor does gc remove what is being built
    with try_exclusive(shards) as free:
        assert free


def test_racing_creates_of_one_candidate_settle_on_one_version(tmp_path):
    """Two processes on different machines (no shared lock) register the same candidate at once."""
    from mlflow import MlflowClient

    from tasks.registry.versions import create_version_once, existing_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the tables, before the race
    logged = SimpleNamespace(model_uri=(tmp_path / "model").as_uri(), model_id=None)
    start, winners = threading.Barrier(2), []

    def register():
        client = MlflowClient(uri)
        start.wait()
        winners.append(str(create_version_once(client, "m", logged, None, "cid-1").version))

    threads = [threading.Thread(target=register) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    client = MlflowClient(uri)
    remaining = [str(v.version) for v in client.search_model_versions("name='m'")]
    assert len(remaining) == 1 and winners == remaining * 2
    assert str(existing_version(client, "m", "cid-1").version) == remaining[0]
