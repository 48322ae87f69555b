"""The MLflow pyfunc of a tokenmill language model, logged as code (no pickled objects).

    mlflow.pyfunc.load_model("models:/tokenmill-lm@champion").predict(["def main("])

Input: a list of prompts, or a DataFrame with a `prompt` column; texts are Unicode-normalized
as the training documents were. Params: `mode`
("generate" returns text, "score" returns bits per byte of each text), `max_new_tokens`,
`temperature`, `top_k`, `seed`. Weights load with torch.load(weights_only=True).

Self-contained: this file imports only `pyfunc_io` and `model`, which travel with it in the
logged model's `code/` directory, and plain libraries; never `tasks` or `tokenmill`.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import torch
from mlflow.models import set_model
from pyfunc_io import bits_per_byte, complete, load_network, normalized, texts_of


class TokenmillLM(mlflow.pyfunc.PythonModel):
    # Inputs are checked by the logged signature and `texts_of`, not by type-hint inference.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import sentencepiece as spm

        config = json.loads(open(context.artifacts["config"], encoding="utf-8").read())
        self.model, _ = load_network(context.artifacts["weights"], config["gpt"])
        self.sp = spm.SentencePieceProcessor(model_file=context.artifacts["tokenizer"])
        self.normalize = config.get("normalize", "none")  # as training documents were; older models: none

    def predict(self, context, model_input, params=None) -> list:
        params = params or {}
        texts = normalized(texts_of(model_input, "prompt"), self.normalize)
        mode = params.get("mode", "generate")
        if mode == "score":
            return [bits_per_byte(self.model, self.sp, t) for t in texts]
        if mode != "generate":
            raise ValueError(f"params.mode is {mode!r}; use 'generate' or 'score'")
        generator = torch.Generator().manual_seed(int(params.get("seed", 0)))
        max_new, temperature = int(params.get("max_new_tokens", 64)), float(params.get("temperature", 0.8))
        top_k = int(params.get("top_k", 50)) or None
        cpu = torch.device("cpu")
        return [complete(self.model, self.sp, t, max_new, temperature, top_k, generator, cpu) for t in texts]


set_model(TokenmillLM())
