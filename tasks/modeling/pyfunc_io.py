"""What the logged pyfunc models (`lm_pyfunc.py`, `classifier_pyfunc.py`) run besides `model/`:
loading the network, reading their input, sampling a completion, scoring a text, encoding
texts for the classifier.

This file travels with every registered model: `tasks.registry.model_store.log_model` logs it with
`code_paths`, so it sits beside `model/` in the model's `code/` directory and the wrappers
import it as the top-level module `pyfunc_io`. It must therefore import only `model` and plain
libraries (numpy, torch, the standard library), never `tasks` or `tokenmill`. tokenmill uses the
same functions from here (evaluation loads and samples with them), so serving and evaluation
load and sample one way.
"""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import torch

from model import GPT, GPTClassifier, GPTConfig


def load_network(weights, gpt: dict, head: dict | None = None, device: str | torch.device = "cpu"):
    """The network in eval mode on `device`, and the state dict it was loaded from: a GPT, or a
    GPTClassifier when `head` names labels. Weights load with `torch.load(weights_only=True)`."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    config = GPTConfig(**gpt)
    model = GPT(config) if head is None else GPTClassifier(config, len(head["labels"]), head.get("pooling", "mean"))
    model.load_state_dict(state)
    return model.to(device).eval(), state


def texts_of(model_input, column: str) -> list[str]:
    """The texts of a pyfunc input: a DataFrame (`column` when present, else its first column),
    an array, one string, or any iterable of values."""
    if hasattr(model_input, "columns"):
        name = column if column in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[name].tolist()]
    if isinstance(model_input, np.ndarray):
        return [str(v) for v in model_input.reshape(-1).tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


def normalized(texts: list[str], form: str) -> list[str]:
    """The texts in the Unicode normalization form training applied to documents ("none" keeps them)."""
    return texts if form == "none" else [unicodedata.normalize(form, t) for t in texts]


@torch.no_grad()
def complete(
    model,
    sp,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
    device: torch.device,
) -> str:
    """The sampled continuation of `prompt`, cut at the first end-of-document token."""
    eos = sp.eos_id()
    ids = sp.encode(prompt) or [eos]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    new = out[0, len(ids) :].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    return sp.decode(new)


@torch.no_grad()
def bits_per_byte(model, sp, text: str) -> float:
    """Bits per UTF-8 byte of `text` as a document of its own (predicted from end-of-document
    on), scored in windows of the model's block size; NaN for an empty text."""
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0:
        return float("nan")
    ids = [sp.eos_id()] + sp.encode(text)
    block = model.config.block_size
    nats = 0.0
    for start in range(0, len(ids) - 1, block):
        chunk = torch.tensor([ids[start : start + block + 1]], dtype=torch.long)
        logits, _ = model(chunk[:, :-1], chunk[:, 1:])
        nats += float(torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum"))
    return nats / math.log(2) / n_bytes


def encode_texts(sp, texts: list[str], max_len: int, normalize: str, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, max_len) right-padded with `pad_id`, lengths (N,)) as the labelled shards hold them.

    An empty text keeps one token (the tokenizer's unknown piece) so pooling has a position to read."""
    texts = normalized(texts, normalize)
    tokens = np.full((len(texts), max_len), pad_id, dtype=np.int64)
    lengths = np.ones(len(texts), dtype=np.int64)
    for row, ids in enumerate(sp.encode(texts, num_threads=1) if texts else []):
        ids = ids[:max_len] or [sp.unk_id()]
        tokens[row, : len(ids)] = ids
        lengths[row] = len(ids)
    return tokens, lengths


def probability_columns(labels: list[str]) -> list[str]:
    """The classifier's output columns after `label`: one probability per class, in label order."""
    return [f"p_{label}" for label in labels]
