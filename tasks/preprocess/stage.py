"""Preprocessing stage: corpus files -> SentencePiece tokenizer -> Arrow shards + manifest.

The output directory is named by a hash of everything that determines its content (corpus
fingerprint, tokenizer and data settings; see base.output_dir), so a verified manifest there
is a cache hit and preprocessing is skipped. One process builds a directory while overlapping
runs wait for it and then reuse it. The task's spec picks the builder: packed token rows for a
language model (lm.py), one padded row per labelled document for a classifier (classify.py).

    from tasks.preprocess.stage import preprocess_corpus
    manifest = preprocess_corpus.fn(corpus, cfg.tokenizer, cfg.data, Path(".tokenmill/shards"))
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from data_catalog.loader import Corpus
from tasks.core import manifest as mf
from tasks.core.atomic import sha256_file
from tasks.core.policy import TRANSIENT_RETRIES
from tasks.core.spec import task_spec
from tasks.preprocess.base import resolve_output
from tasks.preprocess.classify import build_labelled
from tasks.preprocess.lm import build_shards
from tokenmill.config import ClassifyConfig, DataConfig, TokenizerConfig
from tokenmill.console import step
from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive


def labelled_settings(task_name: str, classify: ClassifyConfig | None) -> ClassifyConfig | None:
    """The classify settings when the task trains on labelled documents, else None."""
    if not task_spec(task_name).labelled:
        return None
    return classify or ClassifyConfig()


def verified_manifest_key(context, parameters: dict) -> str | None:
    """Prefect cache key: the output dir and its manifest's sha256, only while every shard verifies.

    A hit returns the stored manifest path without starting Dask; a missing or corrupted
    output gives no key, so the task runs and rebuilds what is missing.
    """
    if parameters.get("refresh"):
        return None
    classify = labelled_settings(parameters.get("task", "lm"), parameters.get("classify"))
    _, _, out = resolve_output(
        parameters["corpus"],
        parameters["tokenizer"],
        parameters["data"],
        parameters["shards_root"],
        parameters.get("reuse_tokenizer"),
        classify,
    )
    manifest = out / mf.MANIFEST
    return f"preprocess-{out.name}-{sha256_file(manifest)[:16]}" if mf.verify(manifest) else None


@task(
    name="preprocess",
    **TRANSIENT_RETRIES,
    cache_key_fn=verified_manifest_key,
    persist_result=True,
    result_serializer="json",
)
def preprocess_corpus(
    corpus: Corpus,
    tokenizer: TokenizerConfig,
    data: DataConfig,
    shards_root: Path,
    dask_address: str | None = None,
    n_workers: int | None = None,
    refresh: bool = False,
    reuse_tokenizer: Path | None = None,
    classify: ClassifyConfig | None = None,
    task: str = "lm",
) -> Path:
    """The path of a verified manifest for this corpus and config, building it if needed;
    `refresh` discards an earlier build and recomputes everything. `reuse_tokenizer` (a
    tokenizer.model, e.g. the warm-start model's) takes the place of training one. For the
    `classify` task the corpus is labelled and becomes one padded row per document."""
    classify = labelled_settings(task, classify)
    if classify is not None and not corpus.entry.labelled:
        raise TokenmillError(
            f"corpus '{corpus.name}' has no labels; set label_field or label_dirs in its catalog "
            "entry, or preprocess it for the language model with --task lm"
        )
    tokenizer, reused, out = resolve_output(corpus, tokenizer, data, shards_root, reuse_tokenizer, classify)
    with exclusive(out, f"building {out}"):  # an overlapping run waits here, then reuses this build
        if (cached := mf.reuse_or_clear(out, refresh)) is not None:
            step(f"{'labelled ' if classify else ''}shards cached: {out} (verified)")
            return cached
        if refresh:
            data = data.model_copy(update={"incremental": False})
        if classify is not None:
            return build_labelled(corpus, tokenizer, data, classify, out, reused, dask_address, n_workers)
        return build_shards(corpus, tokenizer, data, out, reused, dask_address, n_workers)
