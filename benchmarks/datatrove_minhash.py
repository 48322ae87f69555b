"""datatrove's MinHash near-duplicate removal on a JSONL corpus, timed stage by stage: the reference
that benchmarks/quality_bench.py (`--datatrove-python`) sets beside tokenmill's own.

    /tmp/dtvenv/bin/python benchmarks/datatrove_minhash.py docs.jsonl /tmp/dt-out --ngram 5 \
        --buckets 12 --hashes-per-bucket 10 --json dt.json

It runs in a separate interpreter that has datatrove, and never imports tokenmill. Tested with
datatrove 0.10.1; its MinHash stages also need spaCy (the English word tokenizer), xxhash (the
shingle hash), regex, orjson (JSONL) and tokenizers (imported by datatrove.pipeline.dedup):

    python3 -m venv /tmp/dtvenv
    /tmp/dtvenv/bin/pip install datatrove==0.10.1 "xxhash<4" regex orjson spacy tokenizers

The input is one JSONL file of {"id", "text"} documents in corpus order; it is first cut into
`--tasks` consecutive parts (not timed), so the first task reads the first part. Then datatrove's
four stages run one after the other, each on a LocalPipelineExecutor:
  signatures  JsonlReader -> MinhashDedupSignature         (--tasks tasks, --workers processes)
  buckets     MinhashDedupBuckets                          (one task per bucket, as datatrove requires)
  cluster     MinhashDedupCluster, with cluster ids        (one task, as datatrove requires)
  filter      JsonlReader -> MinhashDedupFilter -> JsonlWriter (kept), the removed to an
              exclusion JsonlWriter                        (--tasks tasks)
The result (--json) holds the ids datatrove removed, the cluster of every document it put in one
(from the cluster stage's files), and the wall seconds of each stage and in all.

Matching tokenmill's settings (tokenmill/data_quality.py, tasks/preprocess/near_dup.py):
  - `--ngram` is tokenmill's `near_dup.ngram`, but the words differ: datatrove lower-cases,
    turns digit runs into "0", punctuation (including "_") into spaces and drops diacritics, then
    splits with spaCy's English tokenizer; tokenmill lower-cases and takes runs of letters,
    digits, "_" and non-ASCII bytes.
  - `--buckets` x `--hashes-per-bucket` should be tokenmill's LSH bands x rows at its threshold
    (`near_dup.lsh_params(threshold, num_perm)`, 12 x 10 for 0.8 and 128 values), so both have
    the same S-curve. datatrove then computes just those 120 MinHash values (independent hash
    functions of 64-bit xxhash shingles), where tokenmill computes `num_perm` one-permutation
    values and bands the first 120. datatrove has no threshold beyond that curve: every pair that
    agrees on a whole bucket is a duplicate, where tokenmill also checks that the pair's estimated
    Jaccard (over all 128 values) reaches the threshold. So at 12 x 10 datatrove finds a pair of
    Jaccard 0.8 with probability 0.74 and one of 0.75 with 0.50, where tokenmill finds at most
    about half of those at 0.8 and few at 0.75.
  - datatrove keeps one document per cluster, but not the first in corpus order (union by size),
    so callers should score pairs by cluster, not by which of the two was removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from importlib.metadata import version
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.binaryio import read_tuples_from_file


def split_input(source: Path, folder: Path, parts: int) -> tuple[list[list[str]], int]:
    """`source` cut into `parts` consecutive JSONL files of about equal bytes, streamed: the ids in
    each, in the order datatrove numbers them (documents with text), and the bytes of text in all."""
    total, written, part, text_bytes = source.stat().st_size, 0, 0, 0
    ids: list[list[str]] = [[] for _ in range(parts)]
    folder.mkdir(parents=True)
    out = [open(folder / f"{i:05d}.jsonl", "wb") for i in range(parts)]
    try:
        with source.open("rb") as lines:
            for line in lines:
                doc = json.loads(line) if line.strip() else {}
                if not doc.get("text"):
                    continue  # datatrove's readers skip these too
                while part + 1 < parts and written >= total * (part + 1) / parts:
                    part += 1
                out[part].write(line if line.endswith(b"\n") else line + b"\n")
                written += len(line)
                ids[part].append(str(doc["id"]))
                text_bytes += len(doc["text"].encode("utf-8"))
    finally:
        for f in out:
            f.close()
    return ids, text_bytes


def stages(work: Path, config: MinhashConfig, tasks: int, workers: int) -> dict[str, LocalPipelineExecutor]:
    """datatrove's four MinHash stages, in order, reading `work/input` and writing under `work`."""

    def executor(name: str, pipeline: list, n_tasks: int) -> LocalPipelineExecutor:
        return LocalPipelineExecutor(
            pipeline,
            tasks=n_tasks,
            workers=min(workers, n_tasks),
            logging_dir=str(work / "logs" / name),
            skip_completed=False,
        )

    def reader() -> JsonlReader:
        return JsonlReader(str(work / "input"), compression=None, add_file_path=False)

    return {
        "signatures": executor(
            "signatures", [reader(), MinhashDedupSignature(str(work / "signatures"), config=config)], tasks
        ),
        "buckets": executor(
            "buckets",
            [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)],
            config.num_buckets,
        ),
        "cluster": executor(
            "cluster",
            [MinhashDedupCluster(str(work / "buckets"), str(work / "remove_ids"), config=config, save_cluster_id=True)],
            1,
        ),
        "filter": executor(
            "filter",
            [
                reader(),
                MinhashDedupFilter(
                    str(work / "remove_ids"), exclusion_writer=JsonlWriter(str(work / "removed"), compression=None)
                ),
                JsonlWriter(str(work / "output"), compression=None),
            ],
            tasks,
        ),
    }


def outcome(work: Path, ids: list[list[str]]) -> tuple[list[str], dict[str, int]]:
    """(ids removed, {id: cluster} of every document in a cluster). The removed ones are what the
    filter stage wrote aside; the clusters come from the cluster stage's `<task>.clusters` files
    ((position, cluster) pairs), since the filter stage only attaches cluster ids to the documents
    of tasks that remove something."""
    removed = [
        json.loads(line)["id"]
        for path in sorted((work / "removed").glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    clusters = {}
    for path in sorted((work / "remove_ids").glob("*.clusters")):
        with path.open("rb") as f:
            for position, cluster in read_tuples_from_file(f, "I", "I"):
                clusters[ids[int(path.stem)][position]] = cluster
    return removed, clusters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("documents", type=Path, help="JSONL of {id, text}, in corpus order")
    parser.add_argument("work", type=Path, help="folder for datatrove's files (emptied first)")
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--buckets", type=int, default=12)
    parser.add_argument("--hashes-per-bucket", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="where the result goes (default: WORK/result.json)")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    started = time.perf_counter()
    ids, text_bytes = split_input(args.documents, args.work / "input", args.tasks)
    prepare = time.perf_counter() - started
    config = MinhashConfig(
        n_grams=args.ngram, num_buckets=args.buckets, hashes_per_bucket=args.hashes_per_bucket, seed=args.seed
    )
    seconds = {}
    for name, executor in stages(args.work, config, args.tasks, args.workers).items():
        started = time.perf_counter()
        executor.run()
        seconds[name] = round(time.perf_counter() - started, 2)
    removed, clusters = outcome(args.work, ids)
    result = {
        "datatrove": version("datatrove"),
        "settings": {
            "ngram": args.ngram,
            "buckets": args.buckets,
            "hashes_per_bucket": args.hashes_per_bucket,
            "seed": args.seed,
            "tasks": args.tasks,
            "workers": args.workers,
            "hash": str(config.hash_config),
        },
        "docs": sum(map(len, ids)),
        "text_mb": round(text_bytes / 1e6, 3),
        "prepare_seconds": round(prepare, 2),
        "seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 2),
        "removed": removed,
        "clusters": clusters,
    }
    out = args.json or args.work / "result.json"
    out.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("removed", "clusters")}))


if __name__ == "__main__":
    main()
