"""Preprocessing stage: corpus files -> SentencePiece tokenizer -> Arrow shards + manifest.

`stage` is the task body (output dir, lock, cache, manifest); `lm` and `classify` build the
shards of each task; `sources`, `documents`, `partitions`, `screen` (with `quality` and
`near_dup`), `encode`, `streams`, `labelled`, `tokenizer` and `incremental` are the worker code
Dask runs, which never imports Prefect; `dropped` keeps the record of what was dropped.
"""

from tasks.core.exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"preprocess_corpus": "stage"})
__all__ = ["preprocess_corpus"]
