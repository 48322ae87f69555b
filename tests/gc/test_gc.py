"""`tokenmill gc`: the keep/remove decision on literal trees, removal under locks, and one run on
a real state dir with a SQLite registry whose champion must still load afterwards."""

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from model import GPT, GPTConfig
from tasks.gc.collect import (
    Entry,
    Plan,
    Record,
    Removal,
    RunDir,
    ShardDir,
    Tree,
    Version,
    carry_out,
    decide,
    freed_bytes,
    run_gc,
)
from tasks.registry.versions import registered_versions
from tokenmill.locks import in_use

from preprocess_helpers import small_tokenizer

NOW = 1_000_000.0
OLD = NOW - 7200  # two hours ago
KEY = "0123456789abcdef"


def shard(name: str, mtime: float = OLD, complete: bool = True) -> ShardDir:
    return ShardDir(Entry(f"/s/shards/{name}", mtime, 100), complete)


def run(name: str, mtime: float = OLD, finished: bool = True, checkpoints: bool = True) -> RunDir:
    ckpt = Entry(f"/s/models/{name}/checkpoints", mtime, 40) if checkpoints else None
    return RunDir(Entry(f"/s/models/{name}", mtime, 50), finished, ckpt)


def version(n: int, aliases=(), model: str = "tokenmill-lm", created: float = OLD, manifest_key: str = "") -> Version:
    manifest = f"/s/shards/c-{manifest_key}/manifest.json" if manifest_key else ""
    return Version(model, n, f"run{n}", manifest, f"w{n}", tuple(aliases), created)


def removed(plan: Plan) -> dict[str, str]:
    return {r.entry.path: r.kind for r in plan.remove}


def test_aliased_versions_keep_their_shards_and_training_dirs_while_others_go():
    versions = [
        version(1, ["previous-champion"], manifest_key="1" * 16),
        version(2, manifest_key="2" * 16),
        version(3, ["champion"], manifest_key="3" * 16),
        version(4, ["challenger"], manifest_key="4" * 16),
    ]
    tree = Tree(shards=[shard(f"c-{d * 16}", OLD + int(d)) for d in "1234"], runs=[run(f"run{n}") for n in range(1, 5)])
    plan = decide(tree, versions, keep_last=0, now=NOW)
    gone = removed(plan)
    assert gone == {
        "/s/shards/c-" + "2" * 16: "shards",
        "/s/models/run2": "run",
        "/s/models/run1/checkpoints": "checkpoints",
        "/s/models/run3/checkpoints": "checkpoints",
        "/s/models/run4/checkpoints": "checkpoints",
    }
    assert plan.kept_versions == [
        "tokenmill-lm v1 (previous-champion)",
        "tokenmill-lm v3 (champion)",
        "tokenmill-lm v4 (challenger)",
    ]


def test_keep_last_keeps_the_newest_versions_of_each_registered_model():
    versions = [version(n) for n in range(1, 5)] + [Version("clf", 1, "clf1"), Version("clf", 2, "clf2")]
    tree = Tree(
        runs=[run(f"run{n}", checkpoints=False) for n in range(1, 5)]
        + [run("clf1", checkpoints=False), run("clf2", checkpoints=False)]
    )
    gone = removed(decide(tree, versions, keep_last=2, now=NOW))
    assert gone == {"/s/models/run1": "run", "/s/models/run2": "run"}  # the classifier has only its newest two


def test_the_newest_complete_build_per_corpus_stays_and_an_unfinished_newer_one_too():
    tree = Tree(
        shards=[
            shard(f"python-stdlib-{'a' * 16}", OLD),
            shard(f"python-stdlib-{'b' * 16}", OLD + 10),
            shard(f"python-stdlib-{'c' * 16}", OLD + 20, complete=False),
            shard(f"stdlib-packages-cls-{'d' * 16}", OLD),
            shard(f"python-stdlib-{'e' * 16}", OLD - 5, complete=False),
            shard("not-a-build", OLD),
        ]
    )
    gone = removed(decide(tree, [], keep_last=3, now=NOW))
    assert gone == {f"/s/shards/python-stdlib-{'a' * 16}": "shards", f"/s/shards/python-stdlib-{'e' * 16}": "shards"}


def test_unregistered_runs_older_than_the_newest_kept_version_go_and_newer_ones_stay():
    versions = [version(1, ["champion"], created=OLD)]
    tree = Tree(runs=[run("run1"), run("failed", OLD - 100, finished=False), run("later", OLD + 100, finished=False)])
    gone = removed(decide(tree, versions, keep_last=1, now=NOW))
    assert gone == {"/s/models/run1/checkpoints": "checkpoints", "/s/models/failed": "run"}
    # with no kept version, nothing says an unregistered run is superseded
    assert removed(decide(Tree(runs=[run("failed", finished=False)]), [], keep_last=3, now=NOW)) == {}


def test_a_kept_version_keeps_the_run_dir_its_cached_weights_live_in():
    versions = [version(2, ["champion"])]  # run2 reused run1's training: its weights are in run1/
    record = Record(Entry("/s/models/cache/k.json", OLD, 1), ("/s/models/run1/model.pt",), False, "w2")
    tree = Tree(runs=[run("run1", checkpoints=False)], records=[record])
    assert removed(decide(tree, versions, keep_last=0, now=NOW)) == {}


def test_records_whose_files_are_gone_or_going_are_removed():
    records = [
        Record(Entry("/s/models/cache/lost.json", OLD, 1), ("/s/models/x/model.pt",), True),
        Record(Entry("/s/models/cache/going.json", OLD, 1), ("/s/models/run1/model.pt",), False, "w1"),
        Record(Entry("/s/models/cache/kept.json", OLD, 1), ("/s/models/run2/model.pt",), False, "w2"),
    ]
    tree = Tree(runs=[run("run1", checkpoints=False), run("run2", checkpoints=False)], records=records)
    gone = removed(decide(tree, [version(1), version(2, ["champion"])], keep_last=0, now=NOW))
    assert gone == {
        "/s/models/run1": "run",
        "/s/models/cache/lost.json": "record",
        "/s/models/cache/going.json": "record",
    }


def test_stale_temp_files_go_and_recent_ones_stay_as_does_anything_recent():
    temps = [Entry("/s/shards/c-x/.a.tmp", OLD, 5), Entry("/s/shards/c-x/.b.tmp", NOW - 60, 5)]
    tree = Tree(
        shards=[shard(f"c-{'a' * 16}", NOW - 60), shard(f"c-{'b' * 16}", NOW - 30)],
        runs=[run("run9", NOW - 60)],
        temps=temps,
    )
    versions = [version(1, ["champion"], created=NOW)]
    assert removed(decide(tree, versions, keep_last=1, now=NOW)) == {"/s/shards/c-x/.a.tmp": "temp"}
    assert set(removed(decide(tree, versions, keep_last=1, now=NOW, min_age_s=0))) == {
        "/s/shards/c-x/.a.tmp",
        "/s/shards/c-x/.b.tmp",
        f"/s/shards/c-{'a' * 16}",
        "/s/models/run9",
    }


def test_freed_bytes_count_a_hard_linked_file_only_with_its_last_link():
    a = Entry("/a", 0, 10, ((1, 7, 100, 2),))
    b = Entry("/b", 0, 20, ((1, 7, 100, 2),))
    assert freed_bytes([a]) == [10]
    assert freed_bytes([a, b]) == [110, 20]


def make(path: Path, nbytes: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * nbytes)
    return path


def test_in_use_items_are_skipped_and_a_dry_run_removes_nothing(tmp_path):
    busy, idle = (
        make(tmp_path / "shards" / "busy" / "f", 10).parent,
        make(tmp_path / "shards" / "idle" / "f", 20).parent,
    )
    plan = Plan([Removal(Entry(str(d), 0, n), "shards", "test", str(d)) for d, n in ((busy, 10), (idle, 20))], [], {})
    with in_use(busy):
        dry = carry_out(plan, dry_run=True)
        assert busy.exists() and idle.exists()
        assert (dry.bytes, [r["path"] for r in dry.removed], dry.in_use) == (
            20,
            [str(idle)],
            [{"path": str(busy), "kind": "shards"}],
        )
        report = carry_out(plan, dry_run=False)
    assert busy.exists() and not idle.exists()
    assert report.as_json()["bytes"] == 20 and not report.dry_run


# A real state dir.


def disk_bytes(root: Path) -> int:
    seen, total = set(), 0
    for p in root.rglob("*"):
        st = p.lstat()
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when))


@pytest.fixture
def state(tmp_path, monkeypatch):
    home = tmp_path / "state"
    monkeypatch.setenv("TOKENMILL_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    home.mkdir()
    return home


def register_three(home: Path) -> tuple[list[str], list[Path]]:
    """v1 champion (val_bpb 8), v2 and v3 worse (v3 ends challenger); each with its shard dir and run dir."""
    import mlflow

    from tasks.modeling.checkpoint import weights_sha256
    from tasks.modeling.evaluation import Evaluation
    from tasks.modeling.local_model import LocalModel
    from tasks.registry.versions import register_candidate

    experiment = mlflow.MlflowClient().create_experiment("gc", artifact_location=(home / "mlartifacts").as_uri())
    runs, shard_dirs = [], []
    for n, bpb in enumerate((8.0, 9.0, 9.5), start=1):
        out = home / "shards" / f"tiny-{str(n) * 16}"
        tokenizer, tokenizer_sha, sp = small_tokenizer(out)
        manifest = out / "manifest.json"
        manifest.write_text(
            json.dumps(
                {
                    "corpus": {"name": "tiny", "fingerprint": "f" * 64},
                    "row_len": 16,
                    "tokenizer": {"path": "tokenizer.model", "sha256": tokenizer_sha},
                }
            )
        )
        with mlflow.start_run(experiment_id=experiment) as mlrun:
            pass
        run_dir = home / "models" / mlrun.info.run_id
        torch.manual_seed(n)
        net = GPT(GPTConfig(vocab_size=sp.get_piece_size(), block_size=32, n_layer=1, n_head=2, n_embd=16))
        run_dir.mkdir(parents=True)
        torch.save(net.state_dict(), run_dir / "model.pt")
        make(run_dir / "checkpoints" / "step-10.pt", 3000)
        local = LocalModel(run_dir / "model.pt", out / "tokenizer.model", net.config.__dict__, tokenizer_sha)
        scored = Evaluation(
            local,
            {"val_bpb": bpb},
            "e" * 64,
            1,
            weights_sha256(net.state_dict()),
            [{"prompt": "def", "completion": " f"}],
            task="lm",
        )
        register_candidate.fn(mlrun.info.run_id, scored, manifest, "tiny", "tokenmill-lm", 0.005)
        runs.append(mlrun.info.run_id)
        shard_dirs.append(out)
    return runs, shard_dirs


@pytest.mark.e2e  # starts processes: left out of make test-fast
def test_gc_on_a_real_state_dir_frees_what_it_reports_and_the_champion_still_loads(state):
    import mlflow.pyfunc

    runs, shard_dirs = register_three(state)
    failed = make(state / "models" / ("0" * 32) / "checkpoints" / "step-5.pt", 700).parents[1]
    lost = make(state / "models" / "cache" / "lost.json", 0)
    lost.write_text(
        json.dumps({"key": "k", "outputs": {str(state / "models" / "gone" / "model.pt"): "0"}, "value": {}})
    )
    stale = make(shard_dirs[0] / ".manifest.json.abc.tmp", 50)
    for path in [*shard_dirs, *(state / "models").iterdir()]:
        age(path, 7200)
    age(failed, 9 * 86400)  # failed before any version was registered
    before = disk_bytes(state / "shards") + disk_bytes(state / "models")

    dry = run_gc(state, registered_versions(), keep_last=1, dry_run=True)
    assert disk_bytes(state / "shards") + disk_bytes(state / "models") == before
    report = run_gc(state, registered_versions(), keep_last=1)

    assert report.bytes == dry.bytes > 0
    assert before - (disk_bytes(state / "shards") + disk_bytes(state / "models")) == report.bytes
    assert not shard_dirs[1].exists() and not (state / "models" / runs[1]).exists()  # v2: no alias, not the newest
    assert shard_dirs[0].is_dir() and shard_dirs[2].is_dir() and not stale.exists()
    for kept in (runs[0], runs[2]):
        assert (state / "models" / kept / "model.pt").is_file() and not (
            state / "models" / kept / "checkpoints"
        ).exists()
    assert not failed.exists() and not lost.exists()
    assert report.kept["versions"] == ["tokenmill-lm v1 (champion)", "tokenmill-lm v3 (challenger)"]
    champion = mlflow.pyfunc.load_model("models:/tokenmill-lm@champion")
    assert len(champion.predict(["def"], params={"max_new_tokens": 2})) == 1
    assert run_gc(state, registered_versions(), keep_last=1).removed == []  # nothing left to do


def test_cli_dry_run_on_an_empty_state_dir_has_nothing_to_remove(tmp_path, monkeypatch):
    from tokenmill.cli import app

    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, ["gc", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"removed": [], "bytes": 0, "kept": {"versions": [], "paths": {}}, "in_use": [], "dry_run": True}
    assert "nothing to remove" in result.stderr
    assert not (tmp_path / "empty").exists()  # a dry run on nothing writes nothing


def test_a_shard_dir_being_evaluated_is_in_use_for_gc(tmp_path, monkeypatch):
    from tasks.evaluate import stage
    from tokenmill.config import EvalConfig
    from tokenmill.locks import try_exclusive

    shards = tmp_path / "shards" / "c-0123456789abcdef"
    shards.mkdir(parents=True)
    (shards / "manifest.json").write_text(json.dumps({"shards": [], "tokenizer": {"path": "t.model", "sha256": "x"}}))
    seen = []

    def evaluating(*args, **kwargs):
        with try_exclusive(shards.resolve()) as free:
            seen.append(free)
        raise RuntimeError("stop here")

    monkeypatch.setattr(stage, "fresh_evaluation", evaluating)
    weights = tmp_path / "models" / "r" / "model.pt"
    trained = SimpleNamespace(weights=weights, gpt_config={}, head=None, weights_sha256="")
    with pytest.raises(RuntimeError, match="stop here"):
        stage.evaluate_model.fn(shards / "manifest.json", trained, EvalConfig(), None)
    assert seen == [False]
