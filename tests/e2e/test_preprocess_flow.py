"""The preprocessing task body end to end on a real Dask LocalCluster.

One module-scoped run covers the manifest; further runs cover the cache hit, worker-count
independence, incremental reprocessing with cross-corpus dedup, bad corpora, and a run
killed mid-write (a child process killed with SIGKILL) that a rerun completes.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask
import numpy as np
import pyarrow as pa
import pytest

from data_catalog.loader import resolve_corpus
from tasks.core import manifest as mf
from tasks.core.atomic import sha256_file
from tasks.core.shards import ShardSet
from tasks.preprocess import stage as preprocess
from tasks.preprocess.base import output_dir
from tasks.preprocess.partitions import plan_partitions
from tokenmill.config import DataConfig, TokenizerConfig
from tokenmill.errors import TokenmillError

from preprocess_helpers import python_like_module, write

E2E_TOKENIZER = TokenizerConfig(vocab_size=400, sample_bytes=100_000)
E2E_DATA = DataConfig(context_len=32, val_fraction=0.2, partition_bytes=20_000)


def make_corpus(root: Path, n: int = 40, seed: int = 0) -> Path:
    r = random.Random(seed)
    for i in range(n):
        write(root / f"mod_{i:02d}.py", python_like_module(r, i))
    return root


def run(corpus_dir: Path, shards: Path, tokenizer=E2E_TOKENIZER, data=E2E_DATA, **kw) -> Path:
    with dask.config.set({"temporary-directory": str(shards.parent / "dask")}):
        return preprocess.preprocess_corpus.fn(resolve_corpus(str(corpus_dir)), tokenizer, data, shards, None, **kw)


def shard_shas(manifest_path: Path) -> list[tuple[str, str]]:
    return [(s["split"], s["sha256"]) for s in json.loads(manifest_path.read_text())["shards"]]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One real preprocessing run on ~170 KB of generated Python over a LocalCluster."""
    root = tmp_path_factory.mktemp("e2e")
    make_corpus(root / "src")
    write(root / "src" / "zz_copy.py", (root / "src" / "mod_07.py").read_text())
    manifest_path = run(root / "src", root / "shards")
    return root, resolve_corpus(str(root / "src")), manifest_path


def test_preprocess_writes_a_verified_manifest(e2e):
    _, corpus, manifest_path = e2e
    assert corpus.total_bytes > 150_000
    manifest = mf.verify(manifest_path)
    assert manifest is not None
    assert manifest_path.parent == output_dir(corpus, E2E_TOKENIZER, E2E_DATA, manifest_path.parent.parent)
    assert (manifest["row_len"], manifest["dtype"]) == (33, "uint16")
    assert manifest["tokenizer"]["vocab_size"] == 400 and manifest["tokenizer"]["origin"] == "trained"
    assert manifest["corpus"] == {
        "name": "src",
        "fingerprint": corpus.fingerprint,
        "files": 41,
        "bytes": corpus.total_bytes,
    }
    stats = manifest["stats"]
    assert (stats["docs_in"], stats["duplicates"], stats["docs_out"]) == (41, 1, 40)
    assert stats["partitions_repacked"] == 1  # the copy's partition: its tokens cut out, nothing encoded twice
    assert not (manifest_path.parent / "spans").exists()
    assert stats["docs_val"] > 0 and stats["bytes_per_token"] > 1
    assert stats["tokens"] - stats["tokens_dropped_tail"] == sum((s["rows"] * 32 + 1) for s in manifest["shards"])
    assert len(manifest["partitions"]) == len(plan_partitions(corpus.files, "auto", E2E_DATA.partition_bytes)) >= 5
    assert manifest["problems"] == {}
    for split in ("train", "val"):
        rows = ShardSet.open(manifest_path, split)
        assert len(rows) == sum(s["rows"] for s in manifest["shards"] if s["split"] == split) > 0
        sample = rows.rows(np.arange(len(rows)))
        assert sample.shape[1] == 33 and 0 <= sample.min() and sample.max() < 400
    meta = pa.ipc.open_file(pa.memory_map(str(manifest_path.parent / manifest["shards"][0]["path"]))).schema.metadata
    assert meta[b"tokenizer_sha256"].decode() == manifest["tokenizer"]["sha256"] and meta[b"row_len"] == b"33"


def test_preprocess_a_second_time_is_a_cache_hit(e2e):
    root, _, manifest_path = e2e
    before = {p.name: p.stat().st_mtime_ns for p in manifest_path.parent.iterdir()}
    assert run(root / "src", root / "shards") == manifest_path
    assert {p.name: p.stat().st_mtime_ns for p in manifest_path.parent.iterdir()} == before


def test_shards_do_not_depend_on_the_number_of_workers(e2e):
    root, _, manifest_path = e2e
    tokenizer = TokenizerConfig(vocab_size=400, reuse=str(manifest_path.parent))
    one = run(root / "src", root / "w1", tokenizer, n_workers=1)
    two = run(root / "src", root / "w2", tokenizer, n_workers=2)
    four = run(root / "src", root / "w4", tokenizer, n_workers=4)  # workers forked from a fork server
    assert shard_shas(one) == shard_shas(two) == shard_shas(four) == shard_shas(manifest_path)
    assert [s["path"] for s in json.loads(one.read_text())["shards"]] == [
        s["path"] for s in json.loads(four.read_text())["shards"]
    ]


def test_a_local_cluster_never_starts_more_workers_than_partitions(monkeypatch):
    from tasks.preprocess.cluster import local_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert local_workers(None, 6) == 6  # default: one per core, capped by the partitions
    assert local_workers(None, 63) == 16
    assert local_workers(4, 63) == 4 and local_workers(32, 6) == 6
    assert local_workers(None, 0) == 1


def test_many_local_workers_start_from_a_fork_server_unless_configured_otherwise():
    from tasks.preprocess.cluster import start_method_config

    assert start_method_config(2) == {}
    assert start_method_config(4) == {"distributed.worker.multiprocessing-method": "forkserver"}
    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):
        assert start_method_config(16) == {}


def test_incremental_reencodes_only_what_changed_and_keeps_dedup_exact(tmp_path):
    src = make_corpus(tmp_path / "src", n=80, seed=1)  # many partitions, whatever the tmp path hashes to
    first = json.loads(run(src, tmp_path / "shards").read_text())
    before = {p.identity for p in plan_partitions(resolve_corpus(str(src)).files, "auto", E2E_DATA.partition_bytes)}
    # a new file that repeats a document of a later partition: that partition must change too
    write(src / "mod_05a.py", (src / "mod_25.py").read_text())

    grown_path = run(src, tmp_path / "shards")

    grown = json.loads(grown_path.read_text())
    encoded = [p for p in grown["partitions"] if not p["reused"]]
    corpus = resolve_corpus(str(src))
    parts = plan_partitions(corpus.files, "auto", E2E_DATA.partition_bytes)
    changed = {p.index for p in parts if p.identity not in before}  # the new file's (boundaries rarely shift more)
    repeated = {p.index for p in parts if any(Path(x).name == "mod_25.py" for x in p.paths)}
    assert {p["index"] for p in encoded} == changed | repeated
    assert len(changed | repeated) <= 3 < len(parts)
    assert grown["stats"]["partitions_reused"] == len(parts) - len(encoded)
    assert grown["stats"]["duplicates"] == first["stats"]["duplicates"] + 1
    assert grown["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    fresh = run(
        src,
        tmp_path / "fresh",
        TokenizerConfig(vocab_size=400, reuse=str(grown_path)),
        DataConfig(**{**E2E_DATA.model_dump(), "incremental": False}),
    )
    assert shard_shas(fresh) == shard_shas(grown_path)  # the same shards as a build from scratch


def test_an_explicit_tokenizer_from_another_corpus_is_reused(e2e, tmp_path):
    _, _, manifest_path = e2e
    other = make_corpus(tmp_path / "other", n=12, seed=5)
    reused = run(other, tmp_path / "shards", TokenizerConfig(reuse=str(manifest_path)))
    manifest = json.loads(reused.read_text())
    assert manifest["tokenizer"]["sha256"] == json.loads(manifest_path.read_text())["tokenizer"]["sha256"]
    assert manifest["tokenizer"]["vocab_size"] == 400
    assert manifest["tokenizer"]["origin"].endswith("tokenizer.model")


def test_a_corpus_with_no_usable_documents_names_the_reason(tmp_path):
    write(tmp_path / "bad" / "a.jsonl", '{"body": "x"}\n{"body": "y"}\n')
    write(tmp_path / "bad" / "b.jsonl", "")
    with pytest.raises(
        TokenmillError,
        match=r"no usable documents in 2 files.*dropped_missing_field: 2 \(first: .*a.jsonl:1\).*text_field",
    ):
        run(tmp_path / "bad", tmp_path / "shards")
    assert not list((tmp_path / "shards").glob("*/manifest.json"))


def test_a_fatal_bad_line_stops_the_run_naming_file_and_line(tmp_path):
    make_corpus(tmp_path / "c", n=3)
    lines = [json.dumps({"text": f"record {i} " * 20}) for i in range(200)]
    lines[150] = '{"text": "unterminated'
    write(tmp_path / "c" / "z.jsonl", "\n".join(lines) + "\n")
    data = DataConfig(**{**E2E_DATA.model_dump(), "on_bad_record": "fail", "partition_bytes": 8000})
    with pytest.raises(TokenmillError, match=r"z.jsonl:151: malformed JSON"):
        run(tmp_path / "c", tmp_path / "shards", data=data)


def test_a_vocab_too_large_for_the_sample_is_a_config_hint(tmp_path):
    write(tmp_path / "c" / "a.txt", "tiny corpus, tiny sample")
    with pytest.raises(TokenmillError, match="tokenizer.vocab_size"):
        run(tmp_path / "c", tmp_path / "shards", TokenizerConfig(vocab_size=8000))


KILLED_RUN = """
import sys, time
from pathlib import Path
from data_catalog.loader import resolve_corpus
from tasks.preprocess import encode, stage as preprocess
from tokenmill.config import DataConfig, TokenizerConfig

real = encode.encode_partition

def slow_encode(*args, **kwargs):  # pickled by value, so the workers run it too
    time.sleep(0.3)
    return real(*args, **kwargs)

if __name__ == "__main__":
    encode.encode_partition = slow_encode
    tokenizer = TokenizerConfig(vocab_size=400, sample_bytes=100_000)
    data = DataConfig(context_len=32, val_fraction=0.2, partition_bytes=20_000)
    preprocess.preprocess_corpus.fn(resolve_corpus(sys.argv[1]), tokenizer, data, Path(sys.argv[2]))
"""


def test_a_run_killed_mid_write_leaves_nothing_trusted_and_a_rerun_completes_it(tmp_path):
    src = make_corpus(tmp_path / "src", n=40, seed=2)
    script = write(tmp_path / "killed_run.py", textwrap.dedent(KILLED_RUN))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TOKENMILL_PROGRESS": "0"}
    child = subprocess.Popen(
        [sys.executable, str(script), str(src), str(tmp_path / "shards")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while len(list((tmp_path / "shards").glob("*/parts/*.json"))) < 3 and time.time() < deadline:
            time.sleep(0.02)
            assert child.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    (out,) = (tmp_path / "shards").iterdir()
    assert not (out / mf.MANIFEST).exists()
    for shard in out.glob("*.arrow"):  # every visible shard is whole
        assert pa.ipc.open_file(pa.memory_map(str(shard))).read_all().num_rows > 0

    manifest_path = run(src, tmp_path / "shards")

    manifest = mf.verify(manifest_path)
    assert manifest_path.parent == out
    assert manifest["stats"]["partitions_reused"] >= 3
    assert manifest["stats"]["partitions_reused"] < manifest["stats"]["partitions"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    clean = run(
        src,
        tmp_path / "clean",
        TokenizerConfig(vocab_size=400, reuse=str(manifest_path)),
        DataConfig(**{**E2E_DATA.model_dump(), "incremental": False}),
    )
    assert shard_shas(clean) == shard_shas(manifest_path)
    assert sha256_file(out / "tokenizer.model") == manifest["tokenizer"]["sha256"]
    shutil.rmtree(tmp_path / "clean")


def tokenmill_data(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ["PATH"],
        "TOKENMILL_HOME": str(home),
        "HOME": str(home.parent),
        "TOKENMILL_PROGRESS": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=home.parent,
    )


def test_the_preprocess_command_ends_with_the_manifest_as_json(tmp_path):
    src = make_corpus(tmp_path / "src", n=20, seed=3)
    result = tokenmill_data(
        "preprocess",
        str(src),
        "--preset",
        "tiny",
        "--set",
        "tokenizer.vocab_size=400",
        "--set",
        "data.val_fraction=0.3",
        "--workers",
        "1",
        "--json",
        home=tmp_path / "home",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(out["manifest"]).is_file() and Path(out["manifest"]).is_relative_to(tmp_path / "home" / "shards")
    assert out["stats"]["docs_out"] == 20 and out["tokenizer"]["vocab_size"] == 400
    assert result.stdout.strip().splitlines()[0] == out["manifest"]
    assert "preprocessed src: 20 documents in" in result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["preprocess", "no-such-corpus"], "unknown corpus 'no-such-corpus'"),
        (["preprocess", "python-stdlib", "--set", "data.on_decode_error=maybe"], "data.on_decode_error"),
    ],
)
def test_the_preprocess_command_reports_bad_input_in_one_line(tmp_path, args, expected):
    result = tokenmill_data(*args, home=tmp_path / "home")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and expected in result.stderr
    assert result.stderr.startswith("error: ") and not (tmp_path / "home").exists()
