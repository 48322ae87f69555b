"""The MLflow pyfunc of a tokenmill text classifier, logged as code (no pickled objects).

    clf = mlflow.pyfunc.load_model("models:/tokenmill-classifier@champion")
    clf.predict(["import json\\njson.dumps({})", "import os\\nos.getcwd()"])

Input: a list of texts, one text, or a one-column DataFrame (a `text` column is used when
there are several). Output: a DataFrame with one row per text: `label`, the most likely
class, and `p_<label>` for every class in the model's label order, the softmax
probabilities (each row sums to 1). Texts go through what training did to documents:
Unicode normalization as the shards were built, the model's SentencePiece tokenizer,
truncation to the head's `max_len` tokens and right padding with its `pad_id`; the head's
pooling reads only real tokens. Weights load with torch.load(weights_only=True).

Self-contained: this file imports only `pyfunc_io` and `model`, which travel with it in the
logged model's `code/` directory, and plain libraries; never `tasks` or `tokenmill`.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from pyfunc_io import encode_texts, load_network, probability_columns, texts_of

BATCH = 64  # texts per forward pass, so a large input does not need one huge tensor


class TokenmillClassifier(mlflow.pyfunc.PythonModel):
    # Inputs are checked by the logged signature and `texts_of`, not by type-hint inference.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import sentencepiece as spm

        config = json.loads(open(context.artifacts["config"], encoding="utf-8").read())
        head = config["head"]
        self.labels, self.max_len = list(head["labels"]), int(head["max_len"])
        self.normalize, self.pad_id = head.get("normalize", "none"), int(head["pad_id"])
        self.model, _ = load_network(context.artifacts["weights"], config["gpt"], head)
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
            batch = texts[start : start + BATCH]
            tokens, lengths = encode_texts(self.sp, batch, self.max_len, self.normalize, self.pad_id)
            logits, _ = self.model(torch.from_numpy(tokens), torch.from_numpy(lengths))
            parts.append(torch.softmax(logits.float(), dim=-1).numpy().astype(np.float64))
        return np.concatenate(parts)


set_model(TokenmillClassifier())
