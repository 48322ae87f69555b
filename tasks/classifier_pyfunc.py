"""The MLflow pyfunc of a tokenmill text classifier, logged as code (no pickled objects).

    clf = mlflow.pyfunc.load_model("models:/tokenmill-classifier@champion")
    clf.predict(["import json\\njson.dumps({})", "import os\\nos.getcwd()"])

Input: a list of texts, one text, or a one-column DataFrame (a `text` column is used when
there are several). Output: a DataFrame with one row per text: `label`, the most likely
class, and `p_<label>` for every class in the model's label order, the softmax
probabilities (each row sums to 1). Texts go through what training did to documents:
Unicode normalization as the shards were built, the model's SentencePiece tokenizer,
truncation to the head's `max_len` tokens and right padding with `PAD_ID`; the head's
pooling reads only real tokens. Weights load with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import unicodedata

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model

from model import GPTClassifier, GPTConfig
from tasks.pyfunc_io import texts_of
from tasks.shards import PAD_ID

BATCH = 64  # texts per forward pass, so a large input does not need one huge tensor


def encode_texts(sp, texts: list[str], max_len: int, normalize: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, max_len) right-padded with PAD_ID, lengths (N,)) as the labelled shards hold them.

    An empty text keeps one token (the tokenizer's unknown piece) so pooling has a position to read."""
    if normalize != "none":
        texts = [unicodedata.normalize(normalize, t) for t in texts]
    tokens = np.full((len(texts), max_len), PAD_ID, dtype=np.int64)
    lengths = np.ones(len(texts), dtype=np.int64)
    for row, ids in enumerate(sp.encode(texts, num_threads=1) if texts else []):
        ids = ids[:max_len] or [sp.unk_id()]
        tokens[row, : len(ids)] = ids
        lengths[row] = len(ids)
    return tokens, lengths


def probability_columns(labels: list[str]) -> list[str]:
    return [f"p_{label}" for label in labels]


class TokenmillClassifier(mlflow.pyfunc.PythonModel):
    # Inputs are checked by the logged signature and `_texts`, not by type-hint inference.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import sentencepiece as spm

        config = json.loads(open(context.artifacts["config"], encoding="utf-8").read())
        head = config["head"]
        self.labels, self.max_len = list(head["labels"]), int(head["max_len"])
        self.normalize = head.get("normalize", "none")
        self.model = GPTClassifier(GPTConfig(**config["gpt"]), len(self.labels), head["pooling"])
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()
        self.sp = spm.SentencePieceProcessor(model_file=context.artifacts["tokenizer"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        texts = texts_of(model_input, "text")
        probs = self.probabilities(texts) if texts else np.empty((0, len(self.labels)))
        out = pd.DataFrame(probs, columns=probability_columns(self.labels))
        out.insert(0, "label", [self.labels[i] for i in probs.argmax(axis=1)] if len(probs) else [])
        return out

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> np.ndarray:
        parts = []
        for start in range(0, len(texts), BATCH):
            tokens, lengths = encode_texts(self.sp, texts[start : start + BATCH], self.max_len, self.normalize)
            logits, _ = self.model(torch.from_numpy(tokens), torch.from_numpy(lengths))
            parts.append(torch.softmax(logits.float(), dim=-1).numpy().astype(np.float64))
        return np.concatenate(parts)


set_model(TokenmillClassifier())
