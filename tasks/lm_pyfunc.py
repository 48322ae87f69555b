"""The MLflow pyfunc of a tokenmill language model, logged as code (no pickled objects).

    mlflow.pyfunc.load_model("models:/tokenmill-lm@champion").predict(["def main("])

Input: a list of prompts, or a DataFrame with a `prompt` column. Params: `mode`
("generate" returns text, "score" returns bits per byte of each text), `max_new_tokens`,
`temperature`, `top_k`, `seed`. Weights load with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import math

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import set_model

from model import GPT, GPTConfig
from tasks.pyfunc_io import texts_of
from tasks.report import complete


class TokenmillLM(mlflow.pyfunc.PythonModel):
    # Inputs are checked by the logged signature and `_texts`, not by type-hint inference.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import sentencepiece as spm

        config = json.loads(open(context.artifacts["config"], encoding="utf-8").read())
        self.model = GPT(GPTConfig(**config["gpt"]))
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()
        self.sp = spm.SentencePieceProcessor(model_file=context.artifacts["tokenizer"])

    def predict(self, context, model_input, params=None) -> list:
        params = params or {}
        texts = texts_of(model_input, "prompt")
        if params.get("mode", "generate") == "score":
            return [self._bits_per_byte(t) for t in texts]
        generator = torch.Generator().manual_seed(int(params.get("seed", 0)))
        max_new, temperature = int(params.get("max_new_tokens", 64)), float(params.get("temperature", 0.8))
        top_k = int(params.get("top_k", 50)) or None
        cpu = torch.device("cpu")
        return [complete(self.model, self.sp, t, max_new, temperature, top_k, generator, cpu) for t in texts]

    @torch.no_grad()
    def _bits_per_byte(self, text: str) -> float:
        ids = [self.sp.eos_id()] + self.sp.encode(text)
        n_bytes = len(text.encode("utf-8"))
        if n_bytes == 0:
            return float("nan")
        block = self.model.config.block_size
        nats = 0.0
        for start in range(0, len(ids) - 1, block):
            chunk = torch.tensor([ids[start : start + block + 1]], dtype=torch.long)
            logits, _ = self.model(chunk[:, :-1], chunk[:, 1:])
            nats += float(torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum"))
        return nats / math.log(2) / n_bytes


set_model(TokenmillLM())
