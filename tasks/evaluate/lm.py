"""Evaluation of a language model: loss, perplexity and bits per byte on the frozen eval set
(the first `eval.max_rows` rows of the val split), the unigram baseline, and seeded sample
generations for the fixed prompts.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core import manifest as mf
from tasks.core.shards import ShardSet
from tasks.core.tokenizer import load_tokenizer, piece_byte_lengths
from tasks.evaluate import report
from tasks.modeling.checkpoint import weights_sha256
from tasks.modeling.evaluation import Evaluation
from tasks.modeling.local_model import LocalModel, require_same_tokenizer
from tasks.modeling.metrics import evaluate_rows, unigram_entropy
from tasks.modeling.parallel import pick_device
from tasks.modeling.pyfunc_io import load_network
from tokenmill.config import EvalConfig
from tokenmill.errors import TokenmillError


def evaluate_lm(
    manifest_path: Path, manifest: dict, local: LocalModel, cfg: EvalConfig, device: str = "auto"
) -> Evaluation:
    if local.head:
        raise TokenmillError(
            f"{local.weights} is a classifier, and {manifest_path} holds language-model shards; "
            f"evaluate it on shards preprocessed with task=classify"
        )
    require_same_tokenizer(local, manifest)
    dev = pick_device(device)
    model, state = load_network(local.weights, local.gpt_config, None, dev)
    val = ShardSet.open(manifest_path, "val")
    sp = load_tokenizer(Path(local.tokenizer).read_bytes())
    metrics = evaluate_rows(model, val, cfg.max_rows, cfg.batch_size, piece_byte_lengths(sp), dev)
    metrics["val_unigram_entropy"] = unigram_entropy(val, cfg.max_rows, manifest["tokenizer"]["vocab_size"])
    samples = report.sample_generations(
        model, sp, cfg.prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed, dev
    )
    return Evaluation(
        local, metrics, mf.eval_set_sha(manifest, cfg.max_rows), cfg.max_rows, weights_sha256(state), samples
    )
