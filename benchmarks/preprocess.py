"""Preprocessing throughput, peak memory and scaling, against two references in the same run.

    .venv/bin/python benchmarks/preprocess.py                      # stdlib + synthetic 25 MB and 200 MB
    .venv/bin/python benchmarks/preprocess.py --skip-stdlib --synthetic-mb 1000 --scale-from-mb 125 \
        --big-reps 1 --json out.json

For each corpus, with one tokenizer (trained once, then reused so every method uses the same
model), it measures:
  raw     single-process `SentencePieceProcessor.encode` (num_threads=1, batches) of the
          same documents, already in memory: the limit is cores x this rate; also the same
          work split over `workers` processes at once ("parallel"), which is what the box
          really delivers when its cores do not scale linearly;
  pool    a straightforward multiprocessing.Pool peer in the pattern of Megatron-LM's
          preprocess_data.py: the parent reads documents, workers encode, the parent writes
          one token file;
  ours    `preprocess_corpus` end to end (Dask LocalCluster start, one pass that reads,
          hashes, encodes, packs and writes each partition, the corpus-wide dedup settled
          after it, manifest), with nothing reused.
  standing  (with --standing-cluster) ours again, on a LocalCluster started before the runs
          and passed as a scheduler address, as a scheduled run on a standing cluster sees it:
          no worker start, the workers' imports done.
Peak memory is the RSS summed over the process and all its children, sampled every 50 ms.
CPU time is user + system time of the process and all its (finished) children, so it counts
every Dask and Pool worker; on a shared, busy box it shows the work each method costs even
when the wall time mostly shows what other jobs left over.
The scale test runs `ours` at `--scale-from-mb` and at `--synthetic-mb` (8x by default).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENMILL_PROGRESS", "0")

from data_catalog.loader import resolve_corpus  # noqa: E402
from tasks.core.tokenizer import load_tokenizer  # noqa: E402
from tasks.preprocess import tokenizer as tok  # noqa: E402
from tasks.preprocess.documents import DocRules, Tally, read_documents  # noqa: E402
from tokenmill.config import DataConfig, TokenizerConfig  # noqa: E402

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "shi",
    "ven",
    "dor",
    "al",
    "is",
    "or",
    "eth",
    "um",
    "pra",
    "gle",
    "ton",
]


def cpu_seconds() -> float:
    """User + system CPU time of this process and every child it has waited for."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


class PeakRss:
    """The peak of RSS summed over this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_corpus(root: Path, megabytes: int, file_mb: int = 25, seed: int = 0) -> Path:
    """JSON Lines files of ~4 KB English-like documents with a Zipfian vocabulary; deterministic.

    File i draws from its own generator, seeded by (seed, i), so the files are written in
    parallel and a corpus is the same whatever the number of cores.
    """
    done = root / ".complete"
    if done.exists():  # the generator is deterministic: a finished corpus is reused as it is
        return root
    root.mkdir(parents=True, exist_ok=True)
    sizes = [file_mb * 1_000_000] * (megabytes // file_mb) + (
        [(megabytes % file_mb) * 1_000_000] if megabytes % file_mb else []
    )
    jobs = [(root / f"part-{i:04d}.jsonl", size, seed, i) for i, size in enumerate(sizes)]
    with multiprocessing.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.starmap(_synthetic_file, jobs, chunksize=1)
    done.touch()
    return root


def _synthetic_file(path: Path, target: int, seed: int, index: int) -> None:
    words_rng = np.random.default_rng(seed)  # one vocabulary for every file
    words = np.array(["".join(words_rng.choice(SYLLABLES, size=words_rng.integers(1, 4))) for _ in range(20_000)])
    punct = np.array([" ", " ", " ", " ", " ", " ", ", ", ". ", ".\n", "; ", " (", ") ", ": ", " 19", " 2"])
    rng = np.random.default_rng([seed, index])
    with open(path, "w", encoding="utf-8") as f:
        size = 0
        while size < target:
            n = 700
            w = words[np.minimum(rng.zipf(1.3, size=n * 64) - 1, len(words) - 1)].reshape(64, n)
            p = punct[rng.integers(0, len(punct), size=(64, n))]
            for row_w, row_p in zip(w, p):
                line = json.dumps({"text": "".join(np.char.add(row_w, row_p).tolist())}) + "\n"
                f.write(line)
                size += len(line.encode())


def documents(corpus, limit_bytes: int | None = None) -> list[str]:
    rules = DocRules(format=corpus.entry.format)
    docs, size, tally = [], 0, Tally()
    for f in corpus.files:
        for doc in read_documents(f.path, rules, tally):
            docs.append(doc)
            size += len(doc.encode())
            if limit_bytes and size >= limit_bytes:
                return docs
    return docs


def raw_rate(model_path: Path, docs: list[str]) -> dict:
    """Single-process encode of in-memory documents: MB/s and tokens/s."""
    sp = load_tokenizer(model_path.read_bytes())
    nbytes = sum(len(d.encode()) for d in docs)
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(docs), 256):
        tokens += sum(len(ids) for ids in sp.encode(docs[i : i + 256], num_threads=1))
    seconds = time.perf_counter() - started
    return {"mb_s": nbytes / seconds / 1e6, "tokens_s": tokens / seconds, "bytes": nbytes, "seconds": seconds}


def _raw_share(start_at: float, docs: list[str]) -> tuple[float, int]:
    time.sleep(max(0.0, start_at - time.perf_counter()))  # CLOCK_MONOTONIC: one clock for all processes
    for i in range(0, len(docs), 256):
        _SP.encode(docs[i : i + 256], num_threads=1)
    return time.perf_counter() - start_at, sum(len(d.encode()) for d in docs)


def _ready(_: int) -> bool:
    time.sleep(0.2)  # keeps each worker busy long enough that every worker gets one
    return _SP is not None


def raw_parallel_rate(model_path: Path, docs: list[str], workers: int) -> float:
    """MB/s of `workers` processes encoding shares of in-memory documents at once: what the box can do."""
    shares = [docs[i::workers] for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(
        workers, initializer=_pool_init, initargs=(str(model_path),)
    ) as pool:
        assert all(pool.map(_ready, range(workers), chunksize=1))
        start_at = time.perf_counter() + 1.0  # after the shares are pickled across
        spans = pool.starmap(_raw_share, [(start_at, share) for share in shares], chunksize=1)
    return sum(n for _, n in spans) / max(t for t, _ in spans) / 1e6


_SP = None


def _pool_init(model_path: str) -> None:
    global _SP
    _SP = load_tokenizer(Path(model_path).read_bytes())


def _pool_encode(line_or_path: str) -> tuple[np.ndarray, int]:
    """Megatron's Encoder.encode: one document in, its token ids (with EOS) out."""
    if line_or_path.startswith("{"):
        text = json.loads(line_or_path)["text"]
    else:
        text = Path(line_or_path).read_text(encoding="utf-8", errors="replace")
    ids = _SP.encode(text, num_threads=1)
    ids.append(_SP.eos_id())
    return np.asarray(ids, dtype=np.uint16), len(line_or_path)


def pool_peer(corpus, model_path: Path, workers: int, out: Path) -> dict:
    """The parent reads lines (or file paths), a Pool encodes, the parent writes one .bin file."""

    def inputs():
        for f in corpus.files:
            if f.path.endswith(".jsonl"):
                with open(f.path, encoding="utf-8") as fh:
                    yield from fh
            else:
                yield f.path

    started = time.perf_counter()
    tokens = 0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_pool_init, initargs=(str(model_path),)) as pool, open(out, "wb") as sink:
        for ids, _ in pool.imap(_pool_encode, inputs(), chunksize=32):
            ids.tofile(sink)
            tokens += len(ids)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens}


def ours(
    corpus_ref: str, model_path: Path, workers: int, shards: Path, data: DataConfig, dask_address: str | None = None
) -> dict:
    from tasks.preprocess import stage as preprocess  # imports Prefect: kept out of the Pool workers' start-up

    corpus = resolve_corpus(corpus_ref)
    started = time.perf_counter()
    manifest_path = preprocess.preprocess_corpus.fn(
        corpus, TokenizerConfig(reuse=str(model_path)), data, shards, dask_address, n_workers=workers
    )
    seconds = time.perf_counter() - started
    stats = json.loads(manifest_path.read_text())["stats"]
    phases = {k.removeprefix("seconds_"): v for k, v in stats.items() if k.startswith("seconds_")}
    return {
        "seconds": seconds,
        "tokens": stats["tokens"],
        "docs_out": stats["docs_out"],
        "partitions": stats["partitions"],
        "phases": phases,
    }


def tree_cpu() -> float:
    """User + system CPU time of this process and its live descendants (a standing cluster's)."""
    total = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


@contextlib.contextmanager
def standing_cluster(workers: int):
    """The LocalCluster `preprocess_corpus` would start, started before the timed runs with
    every worker up and its imports done: what a run on an already running scheduler
    (`--dask-address`) sees. Yields its address."""
    from tasks.preprocess.cluster import dask_client

    with dask_client(None, workers) as client:
        client.wait_for_workers(workers)
        client.run(importlib.import_module, "tasks.preprocess.encode")
        yield client.scheduler.address


def measure(
    name: str, corpus_ref: str, model_path: Path, workers: int, work: Path, args, data: DataConfig, reps: int
) -> dict:
    """Both references and ours on one corpus; pool and ours alternate `reps` times and the best of each counts."""
    from tasks.preprocess import stage as preprocess  # noqa: F401  imported here, so its import is not counted in ours' CPU time

    corpus = resolve_corpus(corpus_ref)
    mb = corpus.total_bytes / 1e6
    docs = documents(corpus, args.raw_limit_mb * 1_000_000)
    raw = raw_rate(model_path, docs)
    parallel = raw_parallel_rate(model_path, docs, workers)
    del docs
    pools, mine, warm = [], [], []
    with standing_cluster(workers) if args.standing_cluster else contextlib.nullcontext() as address:
        for _ in range(reps):
            cpu = cpu_seconds()
            with PeakRss() as rss:
                pools.append({**pool_peer(corpus, model_path, workers, work / f"{name}-pool.bin"), "rss": rss.peak})
            pools[-1]["cpu"], cpu = cpu_seconds() - cpu, cpu_seconds()
            with PeakRss() as rss:
                mine.append({**ours(corpus_ref, model_path, workers, work / f"{name}-shards", data), "rss": rss.peak})
            mine[-1]["cpu"] = cpu_seconds() - cpu
            shutil.rmtree(work / f"{name}-shards")
            if address:
                cpu = tree_cpu()
                with PeakRss() as rss:
                    warm.append(
                        {
                            **ours(corpus_ref, model_path, workers, work / f"{name}-shards", data, address),
                            "rss": rss.peak,
                        }
                    )
                warm[-1]["cpu"] = tree_cpu() - cpu
                shutil.rmtree(work / f"{name}-shards")
    pool, best = min(pools, key=lambda r: r["seconds"]), min(mine, key=lambda r: r["seconds"])
    limit = raw["mb_s"] * workers
    row = {
        "corpus": name,
        "mb": round(mb, 1),
        "workers": workers,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "raw_mb_s_1core": round(raw["mb_s"], 2),
        "limit_mb_s": round(limit, 2),
        "raw_parallel_mb_s": round(parallel, 2),
        "pool_mb_s": round(mb / pool["seconds"], 2),
        "pool_s": [round(r["seconds"], 1) for r in pools],
        "pool_peak_rss_mb": round(max(r["rss"] for r in pools) / 1e6),
        "ours_mb_s": round(mb / best["seconds"], 2),
        "ours_s": [round(r["seconds"], 1) for r in mine],
        "ours_peak_rss_mb": round(max(r["rss"] for r in mine) / 1e6),
        "ours_over_limit": round(mb / best["seconds"] / limit, 3),
        "ours_over_parallel": round(mb / best["seconds"] / parallel, 3),
        "ours_over_pool": round(pool["seconds"] / best["seconds"], 3),
        "ours_phases": best["phases"],
        "pool_cpu_s": [round(r["cpu"], 1) for r in pools],
        "ours_cpu_s": [round(r["cpu"], 1) for r in mine],
        "pool_cpu_over_ours_cpu": round(min(r["cpu"] for r in pools) / min(r["cpu"] for r in mine), 3),
        "ours_tokens": best["tokens"],
        "partitions": best["partitions"],
    }
    if warm:
        fastest = min(warm, key=lambda r: r["seconds"])
        row.update(
            {
                "standing_mb_s": round(mb / fastest["seconds"], 2),
                "standing_s": [round(r["seconds"], 1) for r in warm],
                "standing_over_pool": round(pool["seconds"] / fastest["seconds"], 3),
                "standing_over_limit": round(mb / fastest["seconds"] / limit, 3),
                "standing_cpu_s": [round(r["cpu"], 1) for r in warm],
                "standing_phases": fastest["phases"],
            }
        )
    print(json.dumps(row), flush=True)
    return row


def train_tokenizer(corpus_ref: str, out: Path, vocab: int, sample_bytes: int) -> tuple[Path, float]:
    corpus = resolve_corpus(corpus_ref)
    started = time.perf_counter()
    sentences = tok.sample_sentences(
        [f.path for f in corpus.files], DocRules(format=corpus.entry.format), sample_bytes, 1337
    )
    model = tok.train_sentencepiece(sentences, vocab, num_threads=os.cpu_count() or 1)
    out.write_bytes(model)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-mb", type=int, default=200)
    parser.add_argument("--scale-from-mb", type=int, default=25)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--raw-limit-mb", type=int, default=40, help="documents encoded by the raw references")
    parser.add_argument(
        "--reps", type=int, default=2, help="alternating runs of pool and ours; the best of each counts"
    )
    parser.add_argument(
        "--big-reps", type=int, default=None, help="--reps for the --synthetic-mb corpus (default: --reps)"
    )
    parser.add_argument("--skip-stdlib", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed after)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--standing-cluster",
        action="store_true",
        help="also time ours on a cluster started before the runs (as with --dask-address)",
    )
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="tokenmill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = DataConfig(incremental=False)
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": " ".join(sys.argv),
        "rows": [],
    }
    try:
        if not args.skip_stdlib:
            model, seconds = train_tokenizer("python-stdlib", work / "stdlib.model", args.vocab, 8_000_000)
            results["stdlib_tokenizer_train_s"] = round(seconds, 1)
            results["rows"].append(
                measure("python-stdlib", "python-stdlib", model, args.workers, work, args, data, args.reps)
            )
        small = synthetic_corpus(work / f"syn-{args.scale_from_mb}", args.scale_from_mb)
        big = synthetic_corpus(work / f"syn-{args.synthetic_mb}", args.synthetic_mb)
        model, seconds = train_tokenizer(str(small), work / "syn.model", args.vocab, 8_000_000)
        results["synthetic_tokenizer_train_s"] = round(seconds, 1)
        big_reps = args.big_reps or args.reps
        rows = [
            measure(f"synthetic-{mb}MB", str(d), model, args.workers, work, args, data, reps)
            for mb, d, reps in ((args.scale_from_mb, small, args.reps), (args.synthetic_mb, big, big_reps))
        ]
        results["rows"] += rows
        results["scale"] = {
            "data_ratio": round(rows[1]["mb"] / rows[0]["mb"], 2),
            "time_ratio": round(min(rows[1]["ours_s"]) / min(rows[0]["ours_s"]), 2),
            "peak_rss_ratio": round(rows[1]["ours_peak_rss_mb"] / rows[0]["ours_peak_rss_mb"], 3),
        }
        print(json.dumps(results["scale"]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{platform.machine()} {os.cpu_count()} cores, {mem:.0f} GiB RAM, {system}"


if __name__ == "__main__":
    main()
