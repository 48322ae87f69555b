"""Data quality at corpus scale: what near-duplicate removal and the quality filters add to
preprocessing, the memory they need as the corpus grows, and how well planted copies are found.

    .venv/bin/python benchmarks/quality_bench.py --mb 2 --scale-from-mb 1 --work /tmp/qb   # smoke run
    .venv/bin/python benchmarks/quality_bench.py --mb 1000 --scale-from-mb 125 --work /tmp/qb --json q.json \
        --datatrove-python /tmp/dtvenv/bin/python    # a venv with datatrove: see datatrove_minhash.py
    .venv/bin/python benchmarks/quality_bench.py --catalog python-stdlib --reps 3   # what `make run` pays

The corpus (built once per size, kept in --work) is real text: the standard library's Python
and the text under /usr/share/common-licenses and /usr/share/doc, one document per file,
repeated with each copy's words permuted (every word swapped for another of the same length,
a new permutation per copy), so copies are new documents of the same shape rather than
duplicates. About 1% of the documents then get a planted near-duplicate with 1-5% of its words
edited, in a folder that sorts after the originals (corpus order keeps the original); the
pairs are recorded in pairs.json. Then, in one run and with one tokenizer:
  off      `preprocess_corpus` with data.near_dup off and data.quality preset none
  on       the same with near-duplicate removal at its defaults and the code preset
           (what python-stdlib uses), each --reps times, alternating; wall, CPU, peak RSS
  scale    `on` at --scale-from-mb and at --mb: peak RSS of each (issue 16: within 20%)
  planted  recall and precision on the planted pairs, per edit rate and per --thresholds,
           from the same library calls the workers and the client make (signatures, LSH,
           clusters), and the pipeline's own near-duplicate count beside it
  datatrove  (with --datatrove-python) the same documents, in the same order, as JSONL through
           datatrove's own MinHash stages (benchmarks/datatrove_minhash.py, run by that
           interpreter with --workers tasks), at each --datatrove-thresholds with tokenmill's LSH
           bands x rows for it: throughput, peak RSS, and recall and precision on the planted
           pairs scored as tokenmill's are, side by side with tokenmill's at that threshold
Peak RSS is summed over the process and its children (benchmarks/preprocess.py's PeakRss).
A copy counts as found when the tool puts it in a cluster (tokenmill: drops it), and as right
when its original is in the same cluster; recall = right / planted, precision = right / found.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENMILL_PROGRESS", "0")

from benchmarks.preprocess import PeakRss, cpu_seconds, machine, train_tokenizer  # noqa: E402
from data_catalog.loader import resolve_corpus  # noqa: E402
from tasks.preprocess import near_dup  # noqa: E402
from tasks.preprocess.documents import doc_hash  # noqa: E402
from tasks.preprocess.encode import find_duplicates  # noqa: E402
from tokenmill.config import DataConfig, TokenizerConfig  # noqa: E402
from tokenmill.data_quality import NearDupConfig  # noqa: E402

SOURCES = ["{stdlib}/**/*.py", "/usr/share/common-licenses/*", "/usr/share/doc/**/copyright"]
EDIT_RATES = (0.01, 0.02, 0.03, 0.04, 0.05)
DATATROVE = Path(__file__).with_name("datatrove_minhash.py")
_WORD = re.compile(r"[A-Za-z]+")


def base_documents() -> list[str]:
    import sysconfig
    from glob import glob

    stdlib = sysconfig.get_paths()["stdlib"]
    docs = []
    for pattern in SOURCES:
        for path in sorted(glob(pattern.format(stdlib=stdlib), recursive=True)):
            if "site-packages" in path or not os.path.isfile(path):
                continue
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if len(text.split()) >= 20:
                docs.append(text)
    return docs


def permuted(docs: list[str], seed: int) -> list[str]:
    """The documents with every word swapped for another of its length (one permutation for all)."""
    r = random.Random(seed)
    by_length: dict[int, list[str]] = {}
    for word in sorted({w for d in docs for w in _WORD.findall(d)}):
        by_length.setdefault(len(word), []).append(word)
    mapping = {}
    for words in by_length.values():
        shuffled = words[:]
        r.shuffle(shuffled)
        mapping.update(zip(words, shuffled))
    return [_WORD.sub(lambda m: mapping[m.group()], d) for d in docs]


def edited(r: random.Random, text: str, rate: float, vocabulary: list[str]) -> str:
    """`text` with `rate` of its words replaced, deleted or followed by an inserted word (words:
    what whitespace separates; the empty strings between the spaces of indented code are not)."""
    words = text.split(" ")
    real = [i for i, w in enumerate(words) if w.strip()]
    for i in sorted(r.sample(real, max(1, round(len(real) * rate))), reverse=True):
        action = r.random()
        if action < 0.6:
            words[i] = r.choice(vocabulary)
        elif action < 0.8:
            del words[i]
        else:
            words.insert(i + 1, r.choice(vocabulary))
    return " ".join(words)


def build_corpus(work: Path, megabytes: float, seed: int = 0) -> Path:
    """A corpus of about `megabytes` with planted near-duplicates; reused when already built."""
    root = work / f"corpus-{megabytes:g}mb"
    if (root / "pairs.json").is_file():
        return root
    base, target, written = base_documents(), int(megabytes * 1e6), 0
    vocabulary = sorted({w for d in base[:200] for w in _WORD.findall(d)})
    r, originals, copy = random.Random(seed), [], 0
    while written < target:
        for i, text in enumerate(permuted(base, seed + copy) if copy else base):
            path = root / "corpus" / f"c{copy:04d}" / f"{i:05d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written += len(text.encode("utf-8"))
            if r.random() < 0.01:
                originals.append(path)
            if written >= target:
                break
        copy += 1
    pairs = []
    for j, original in enumerate(originals):
        rate = EDIT_RATES[j % len(EDIT_RATES)]
        planted = root / "corpus" / "zz_planted" / f"{j:05d}.txt"
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_text(edited(r, original.read_text(encoding="utf-8"), rate, vocabulary), encoding="utf-8")
        pairs.append({"copy": str(planted), "original": str(original), "rate": rate})
    (root / "pairs.json").write_text(json.dumps(pairs))
    return root


def preprocess(corpus_ref: str, model: Path, shards: Path, data: DataConfig, workers: int) -> dict:
    from tasks.preprocess import stage

    corpus = resolve_corpus(corpus_ref)
    cpu, started = cpu_seconds(), time.perf_counter()
    with PeakRss() as rss:
        manifest = stage.preprocess_corpus.fn(
            corpus, TokenizerConfig(reuse=str(model)), data, shards, None, n_workers=workers, refresh=True
        )
    stats = json.loads(Path(manifest).read_text())["stats"]
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(cpu_seconds() - cpu, 2),
        "peak_rss_mb": round(rss.peak / 2**20),
        "mb": round(corpus.total_bytes / 1e6, 1),
        "docs_in": stats["docs_in"],
        "duplicates": stats.get("duplicates", 0),
        "near_duplicates": stats.get("near_duplicates", 0),
        "dropped": {k: v for k, v in stats.items() if k.startswith("dropped_")},
        "phases": {k.removeprefix("seconds_"): v for k, v in stats.items() if k.startswith("seconds_")},
    }


def corpus_texts(corpus_dir: Path) -> Iterator[tuple[str, str]]:
    """(path, text) of every document, in the pipeline's order and normalisation."""
    for f in resolve_corpus(str(corpus_dir / "corpus")).files:
        yield f.path, unicodedata.normalize("NFC", Path(f.path).read_bytes().decode("utf-8", errors="replace"))


def planted_pairs(corpus_dir: Path) -> tuple[dict[str, int], dict[int, dict]]:
    """({path: corpus position}, {position of a planted copy: its pair})."""
    paths = [f.path for f in resolve_corpus(str(corpus_dir / "corpus")).files]
    index = {p: i for i, p in enumerate(paths)}
    return index, {index[p["copy"]]: p for p in json.loads((corpus_dir / "pairs.json").read_text())}


def pair_scores(copies: dict[int, dict], index: dict[str, int], found: set[int], cluster: Callable) -> dict:
    """Recall and precision on the planted pairs (overall and recall per edit rate): a copy is right
    when it is `found` and `cluster(copy) == cluster(its original)`."""
    hits = [i for i in copies if i in found]
    right = [i for i in hits if cluster(i) == cluster(index[copies[i]["original"]])]
    by_rate = {}
    for rate in EDIT_RATES:
        planted = [i for i, p in copies.items() if p["rate"] == rate]
        caught = [i for i in right if copies[i]["rate"] == rate]
        by_rate[f"{rate:.2f}"] = round(len(caught) / len(planted), 3) if planted else None
    return {
        "planted": len(copies),
        "recall": round(len(right) / max(len(copies), 1), 4),
        "precision": round(len(right) / max(len(hits), 1), 4),
        "recall_by_edit_rate": by_rate,
    }


def planted_quality(corpus_dir: Path, thresholds: list[float], ngram: int) -> list[dict]:
    """Recall and precision on the planted pairs, per threshold and edit rate, over the corpus in
    the pipeline's order and normalisation (one partition: the result does not depend on it)."""
    index, copies = planted_pairs(corpus_dir)
    cfg = NearDupConfig(ngram=ngram)
    hashes, rows, batch = [], [], []
    for _, text in corpus_texts(corpus_dir):
        hashes.append(doc_hash(text))
        batch.append(text)
        if sum(map(len, batch)) > 1 << 20:
            rows.append(near_dup.signatures(batch, cfg))
            batch = []
    rows.append(near_dup.signatures(batch, cfg))
    sig = np.concatenate(rows)
    exact = find_duplicates([np.array(hashes, np.uint64)])
    first_seen: dict[int, int] = {}
    first_of = [first_seen.setdefault(h, i) for i, h in enumerate(hashes)]
    out = []
    for threshold in thresholds:
        found = near_dup.near_duplicates(
            [len(index)], lambda _: sig, exact, NearDupConfig(threshold=threshold, ngram=ngram)
        )
        kept_of = dict(zip(found.drops[0].tolist(), found.kept[0][:, 1].tolist()))

        # A cluster is named by its kept document. An original that exactly repeats an earlier
        # document was dropped by exact dedup before the near-duplicate search, and its copy
        # clusters with that earlier, identical document: name both by the first occurrence.
        def cluster(i: int, k: dict = kept_of) -> int:
            first = first_of[i]
            return k.get(first, first)

        scores = pair_scores(copies, index, set(kept_of), cluster)
        other = len(kept_of) - sum(i in copies for i in kept_of)  # within the base corpus itself
        out.append({"threshold": threshold, "ngram": ngram, **scores, "other_near_duplicates": other})
    return out


def corpus_jsonl(corpus_dir: Path) -> Path:
    """The corpus as JSONL of {"id": path under corpus/, "text"}, same documents in the same order
    as the pipeline reads them; written once (atomically) and reused."""
    out = corpus_dir / "corpus.jsonl"
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for path, text in corpus_texts(corpus_dir):
                f.write(json.dumps({"id": os.path.relpath(path, corpus_dir / "corpus"), "text": text}) + "\n")
        tmp.replace(out)
    return out


def datatrove_quality(python: str, corpus_dir: Path, work: Path, threshold: float, ngram: int, workers: int) -> dict:
    """datatrove's MinHash stages over the corpus with tokenmill's bands x rows at `threshold`:
    its stage timings, the wall and peak RSS of the whole subprocess (not CPU: datatrove's pool
    workers are not children it waits for), and its scores on the planted pairs."""
    bands, rows = near_dup.lsh_params(threshold, NearDupConfig().num_perm)
    documents, out = corpus_jsonl(corpus_dir), work / f"datatrove-{threshold:g}"
    command = [python, str(DATATROVE), str(documents), str(out / "run"), "--ngram", str(ngram)]
    command += ["--buckets", str(bands), "--hashes-per-bucket", str(rows), "--tasks", str(workers)]
    command += ["--workers", str(workers), "--json", str(work / f"datatrove-{threshold:g}.json")]
    started = time.perf_counter()
    with PeakRss() as rss, (work / f"datatrove-{threshold:g}.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        sys.exit(f"datatrove failed (exit {done.returncode}); its log: {log.name}")
    result = json.loads((work / f"datatrove-{threshold:g}.json").read_text())
    index, copies = planted_pairs(corpus_dir)
    position = {os.path.relpath(p, corpus_dir / "corpus"): i for p, i in index.items()}
    clusters = {position[d]: c for d, c in result["clusters"].items()}
    scores = pair_scores(copies, index, set(clusters), lambda i: clusters.get(i, -1 - i))
    removed = {position[d] for d in result["removed"]}
    mb = resolve_corpus(str(corpus_dir / "corpus")).total_bytes / 1e6
    return {
        "threshold": threshold,
        "datatrove": result["datatrove"],
        "settings": result["settings"],
        "mb": round(mb, 1),
        "seconds": result["total_seconds"],
        "stage_seconds": result["seconds"],
        "process_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(rss.peak / 2**20),
        "mb_per_s": round(mb / result["total_seconds"], 3),
        **scores,
        "removed": len(removed),
        "other_near_duplicates": len(removed - set(copies)),
    }


def side_by_side(report: dict) -> list[str]:
    """Table lines: tokenmill (preprocessing with near-dup on, and what near-dup and the filters
    add) beside datatrove, at each threshold datatrove ran at."""
    on = min((r for r in report["runs"] if r["name"] == "on"), key=lambda r: r["seconds"])
    off = min(r["seconds"] for r in report["runs"] if r["name"] == "off")
    added = on["mb"] / (on["seconds"] - off) if on["seconds"] > off else None
    lines = [f"{'':34}{'MB/s':>8}{'recall':>8}{'precision':>10}  recall by edit rate"]
    for dt in report["datatrove"]:
        ours = next(p for p in report["planted"] if p["threshold"] == dt["threshold"])
        settings = dt["settings"]
        lines.append(f"threshold {dt['threshold']} ({settings['buckets']} x {settings['hashes_per_bucket']} LSH):")
        for name, mb_s, q in (
            ("tokenmill preprocess, near-dup on", on["mb"] / on["seconds"], ours),
            ("tokenmill near-dup + filters only", added, None),
            (f"datatrove {dt['datatrove']} MinHash", dt["mb_per_s"], dt),
        ):
            score = f"{q['recall']:>8}{q['precision']:>10}  {q['recall_by_edit_rate']}" if q else ""
            lines.append(f"  {name:32}{'n/a' if mb_s is None else f'{mb_s:.2f}':>8}{score}")
    return lines


def catalog_overhead(name: str, work: Path, reps: int, workers: int, vocab: int) -> dict:
    """A catalog corpus (python-stdlib: what `make run` preprocesses) with near-duplicate removal
    and its entry's quality filters, against neither, alternating, with one tokenizer."""
    entry = resolve_corpus(name).entry
    model, _ = train_tokenizer(name, work / f"tokenizer-{name}.model", vocab, 8_000_000)
    configs = {
        "off": DataConfig(near_dup={"enabled": False}, quality={"preset": "none"}, incremental=False),
        "on": DataConfig(**{**entry.data, "incremental": False}),
    }
    runs = []
    for rep in range(reps):
        for label, data in configs.items():
            runs.append(
                {"name": label, "rep": rep, **preprocess(name, model, work / f"shards-{name}-{label}", data, workers)}
            )
            print(json.dumps(runs[-1]), flush=True)
    best = {n: min(r["seconds"] for r in runs if r["name"] == n) for n in configs}
    return {"corpus": name, "runs": runs, "overhead": round(best["on"] / best["off"] - 1, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/quality-bench"))
    parser.add_argument("--mb", type=float, default=1000.0)
    parser.add_argument("--scale-from-mb", type=float, default=None, help="default: --mb / 8")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--datatrove-python", default=None, help="an interpreter with datatrove: run it beside")
    parser.add_argument("--datatrove-thresholds", type=float, nargs="+", default=[NearDupConfig().threshold])
    parser.add_argument("--catalog", default=None, help="instead: overhead on this catalog corpus (python-stdlib)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.catalog:
        report = {
            "machine": machine(),
            **catalog_overhead(args.catalog, args.work, args.reps, args.workers, args.vocab),
        }
        print(f"{args.catalog}: near-dup + filters add {report['overhead']:.1%} to preprocessing (best of {args.reps})")
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    small_mb = args.scale_from_mb or args.mb / 8

    corpus = build_corpus(args.work, args.mb)
    small = build_corpus(args.work, small_mb, seed=1)
    model, _ = train_tokenizer(
        str(corpus / "corpus"), args.work / "tokenizer.model", args.vocab, min(8_000_000, int(args.mb * 4e5))
    )
    off = DataConfig(near_dup={"enabled": False}, quality={"preset": "none"}, incremental=False)
    on = DataConfig(quality={"preset": "code"}, incremental=False)
    report: dict = {"machine": machine(), "mb": args.mb, "workers": args.workers, "runs": []}
    for rep in range(args.reps):
        for name, data in (("off", off), ("on", on)):
            result = preprocess(str(corpus / "corpus"), model, args.work / f"shards-{name}", data, args.workers)
            report["runs"].append({"name": name, "rep": rep, **result})
            print(json.dumps(report["runs"][-1]), flush=True)
    best = {n: min(r["seconds"] for r in report["runs"] if r["name"] == n) for n in ("off", "on")}
    report["overhead"] = round(best["on"] / best["off"] - 1, 3)
    scaled = preprocess(str(small / "corpus"), model, args.work / "shards-small", on, args.workers)
    full_rss = max(r["peak_rss_mb"] for r in report["runs"] if r["name"] == "on")
    report["scale"] = {"small": scaled, "rss_ratio": round(full_rss / scaled["peak_rss_mb"], 3)}
    extra = [t for t in args.datatrove_thresholds if args.datatrove_python and t not in args.thresholds]
    report["planted"] = planted_quality(corpus, args.thresholds + extra, args.ngram)
    print(json.dumps({k: report[k] for k in ("overhead", "planted")}, indent=1))
    print(f"peak RSS {scaled['mb']} MB -> {report['runs'][-1]['mb']} MB: x{report['scale']['rss_ratio']}")
    if args.datatrove_python:
        report["datatrove"] = [
            datatrove_quality(args.datatrove_python, corpus, args.work, t, args.ngram, args.workers)
            for t in args.datatrove_thresholds
        ]
        print(json.dumps(report["datatrove"], indent=1))
        print("\n".join(side_by_side(report)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
