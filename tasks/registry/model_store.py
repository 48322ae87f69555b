"""A model on disk (weights, tokenizer, shapes, classification head) and its round trip through MLflow.

The model is logged as a pyfunc *from code* (`tasks/registry/lm_pyfunc.py` for a language model,
`tasks/registry/classifier_pyfunc.py` for a classifier) with its weights, tokenizer and config as plain
artifacts, so loading never unpickles anything: weights come back through
`torch.load(weights_only=True)`. The pytorch flavor's default pt2 export was not used on
purpose: it ties the artifact to one torch version's export format and cannot carry the
tokenizer that makes the model usable from text.

The logged model is self-contained: the wrapper imports only what `code_paths` puts in its
`code/` directory (the `model` package and `pyfunc_io.py`) and the libraries its
`requirements.txt` pins to the versions it was trained with, so it loads, and `mlflow models
serve` serves it, where tokenmill is not installed:

    model/
      MLmodel                 python_function: code: code, model_code_path: lm_pyfunc.py
      lm_pyfunc.py            (or classifier_pyfunc.py)
      code/model/, code/pyfunc_io.py
      artifacts/              model.pt, tokenizer.model, config.json (shapes, head, weights_sha256)
      requirements.txt        torch==..., sentencepiece==..., numpy==..., mlflow==... (+ pandas)
      input_example.json, serving_input_example.json
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

from tasks.core.atomic import sha256_file
from tasks.modeling import pyfunc_io
from tasks.modeling.local_model import LocalModel, file_weights_sha256, logged_head, training_normalization
from tokenmill.credentials import raise_refusal
from tokenmill.errors import TokenmillError

PYFUNC_CODE = Path(__file__).with_name("lm_pyfunc.py")
CLASSIFIER_PYFUNC_CODE = Path(__file__).with_name("classifier_pyfunc.py")
# What the wrappers import besides plain libraries; it travels in the logged model's code/.
PYFUNC_IO = Path(pyfunc_io.__file__)
# The libraries each wrapper imports, pinned at log time (`requirements`).
LM_LIBRARIES = ("torch", "sentencepiece", "numpy", "mlflow")
CLASSIFIER_LIBRARIES = (*LM_LIBRARIES, "pandas")
# Small on purpose: logging a model with an example predicts it once to validate it.
LM_EXAMPLE = (["def main("], {"max_new_tokens": 8})
CLASSIFIER_EXAMPLE = ["import os\nprint(os.getcwd())\n"]


def requirements(libraries) -> list[str]:
    """`name==version` of each installed library, without a local build suffix (torch's
    `2.13.0+cpu` pins as `2.13.0`) so that the pin installs from PyPI."""
    return [f"{name}=={version(name).split('+')[0]}" for name in libraries]


def code_paths() -> list[str]:
    """The `model` package (found without importing torch) and `pyfunc_io.py`."""
    package = Path(importlib.util.find_spec("model").origin).parent
    return [str(package), str(PYFUNC_IO)]


@contextmanager
def wrapper_importable():
    """MLflow runs the wrapper file in this process while logging it, before the wrapper's
    code/ directory is on `sys.path`; meanwhile its `import pyfunc_io` finds this checkout's
    (not a copy that a model loaded earlier in this process left in `sys.modules`)."""
    saved = sys.modules.get("pyfunc_io")
    sys.modules["pyfunc_io"] = pyfunc_io
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("pyfunc_io", None)
        else:
            sys.modules["pyfunc_io"] = saved


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a list of prompts or a one-column frame
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("mode", "string", "generate"),
                ParamSpec("max_new_tokens", "long", 64),
                ParamSpec("temperature", "double", 0.8),
                ParamSpec("top_k", "long", 50),
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


def classifier_signature(labels: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a list of texts or a one-column frame
        outputs=Schema(
            [
                ColSpec("string", "label"),
                *(ColSpec("double", column) for column in pyfunc_io.probability_columns(labels)),
            ]
        ),
    )


def log_model(run_id: str, model: LocalModel, manifest_path: Path, corpus_name: str, weights_sha256: str = ""):
    """Log the pyfunc, the manifest and the dataset lineage into `run_id`; return the ModelInfo.

    config.json records the weights' sha256 (`weights_sha256` when the caller has it, else hashed
    here), so whoever holds only the model can verify them."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    manifest_sha = sha256_file(manifest_path)
    manifest = json.loads(Path(manifest_path).read_text())
    config = {
        "gpt": model.gpt_config,
        "tokenizer_sha256": model.tokenizer_sha256,
        "manifest_sha256": manifest_sha,
        "weights_sha256": weights_sha256 or file_weights_sha256(model.weights),
        "normalize": training_normalization(manifest),
    }
    if model.head is not None:
        config["head"] = logged_head(model.head, manifest)
        code, signature = CLASSIFIER_PYFUNC_CODE, classifier_signature(config["head"]["labels"])
        example, libraries = CLASSIFIER_EXAMPLE, CLASSIFIER_LIBRARIES
    else:
        code, signature, example, libraries = PYFUNC_CODE, model_signature(), LM_EXAMPLE, LM_LIBRARIES
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config))
        mlflow.log_artifact(str(manifest_path), "data")
        mlflow.log_artifact(str(model.tokenizer), "data")
        mlflow.log_artifact(str(config_path), "data")
        dataset = MetaDataset(resolve_dataset_source(str(manifest_path)), name=corpus_name, digest=manifest_sha[:32])
        fingerprint = manifest["corpus"]["fingerprint"]
        mlflow.log_input(
            dataset, context="training", tags={"manifest_sha256": manifest_sha, "corpus_fingerprint": fingerprint}
        )
        with wrapper_importable():
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts={
                    "weights": str(model.weights),
                    "tokenizer": str(model.tokenizer),
                    "config": str(config_path),
                },
                signature=signature,
                input_example=example,
                code_paths=code_paths(),
                pip_requirements=requirements(libraries),
            )


def download_model(model_uri: str, dst: Path | None = None) -> LocalModel:
    """Fetch a registered model's weights, tokenizer and config to local disk."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst) if dst else None))
    except MlflowException as exc:
        raise_refusal(exc)
        raise TokenmillError(
            f"cannot load {model_uri}: {exc.message.splitlines()[0]}; check `tokenmill models`"
        ) from None
    from mlflow.models import Model

    try:
        artifacts = Model.load(str(root)).flavors["python_function"]["artifacts"]
        files = {key: root / artifacts[key]["path"] for key in ("weights", "tokenizer", "config")}
    except (KeyError, OSError, MlflowException):
        raise TokenmillError(f"{model_uri} is not a tokenmill model (no weights/tokenizer/config artifacts)") from None
    config = json.loads(files["config"].read_text())
    return LocalModel(
        files["weights"], files["tokenizer"], config["gpt"], config["tokenizer_sha256"], config.get("head")
    )
