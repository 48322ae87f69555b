"""Near-duplicates and the record of what was dropped, as a new user meets them: a tiny corpus with
planted copies (a few words edited; named to sort after their originals, which corpus order
keeps) through `tokenmill preprocess`, on 1 and 2 workers."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from preprocess_helpers import python_like_module, write

PLANTED = {"x_a.py": "mod_02.py", "x_b.py": "mod_05.py", "x_c.py": "mod_09.py", "x_d.py": "mod_09.py"}


def edited(r: random.Random, text: str, n: int = 3) -> str:
    """`text` with `n` of its words replaced (about 0.5% of a module's words: Jaccard about 0.95)."""
    words = text.split(" ")
    for i in r.sample([i for i, w in enumerate(words) if w.strip()], n):
        words[i] = "edited"
    return " ".join(words)


def make_corpus(root: Path) -> Path:
    r = random.Random(7)
    for i in range(12):
        write(root / f"mod_{i:02d}.py", python_like_module(r, i))
    for copy, original in PLANTED.items():
        write(root / copy, edited(r, (root / original).read_text()))
    write(root / "zz_exact.py", (root / "mod_03.py").read_text())
    return root


def preprocess(src: Path, home: Path, workers: int, *extra: str) -> tuple[dict, str]:
    env = {
        "PATH": os.environ["PATH"],
        "TOKENMILL_HOME": str(home),
        "HOME": str(home.parent),
        "TOKENMILL_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    home.parent.mkdir(parents=True, exist_ok=True)
    args = ["preprocess", str(src), "--preset", "tiny", "--set", "tokenizer.vocab_size=400"]
    args += ["--set", "data.partition_bytes=15000", "--set", "data.val_fraction=0.3", "--workers", str(workers)]
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *args, *extra, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=home.parent,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_planted_near_duplicates_are_counted_sampled_with_their_originals_and_worker_independent(tmp_path):
    src = make_corpus(tmp_path / "src")
    one, stderr = preprocess(src, tmp_path / "one" / "home", 1, "--explain-drop", "2")
    two, _ = preprocess(src, tmp_path / "two" / "home", 2)

    stats = one["stats"]
    assert (stats["docs_in"], stats["duplicates"], stats["near_duplicates"], stats["docs_out"]) == (17, 1, 4, 12)
    assert one["dropped"]["near_duplicate"]["docs"] == 4
    assert one["dropped"]["near_duplicate"]["bytes"] == sum((src / c).stat().st_size for c in PLANTED)
    assert "1 duplicates, 4 near-duplicates" in stderr and "near_duplicate 4" in stderr

    out = Path(one["manifest"]).parent
    sample = [json.loads(line) for line in (out / "dropped" / "near_duplicate.jsonl").read_text().splitlines()]
    pairs = {Path(e["where"]).name: Path(e["kept"]["where"]).name for e in sample}
    assert pairs == PLANTED
    assert all(e["similarity"] >= 0.8 and e["kept"]["text"] for e in sample)
    exact = json.loads((out / "dropped" / "duplicate.jsonl").read_text())
    assert (Path(exact["where"]).name, Path(exact["kept"]["where"]).name) == ("zz_exact.py", "mod_03.py")
    assert "near_duplicate: 4 sampled" in stderr and "repeats " in stderr

    shards = lambda m: [(s["split"], s["path"], s["sha256"]) for s in json.loads(Path(m).read_text())["shards"]]  # noqa: E731
    assert shards(one["manifest"]) == shards(two["manifest"])
    assert two["stats"]["near_duplicates"] == 4 and two["dropped"] == one["dropped"]
    assert (Path(two["manifest"]).parent / "dropped" / "near_duplicate.jsonl").read_bytes() == (
        out / "dropped" / "near_duplicate.jsonl"
    ).read_bytes()

    # A grown corpus: unchanged partitions (and their signatures) are reused, and the new copy is
    # deduplicated against everything already kept.
    write(src / "x_e.py", edited(random.Random(8), (src / "mod_07.py").read_text()))
    grown, _ = preprocess(src, tmp_path / "one" / "home", 1)
    assert grown["stats"]["near_duplicates"] == 5 and grown["stats"]["partitions_reused"] >= 1
    out = Path(grown["manifest"]).parent
    sample = [json.loads(line) for line in (out / "dropped" / "near_duplicate.jsonl").read_text().splitlines()]
    assert {Path(e["where"]).name: Path(e["kept"]["where"]).name for e in sample} == {**PLANTED, "x_e.py": "mod_07.py"}
