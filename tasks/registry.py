"""The only module that touches the MLflow model registry: log, register, gate, alias.

Registration is idempotent: a version is looked up by its candidate id (the MLflow run id)
before a new one is created, so a retried task never makes a duplicate.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.policy import retry_transient
from tasks.promotion import Candidate, Decision, IncomparableModels, decide
from tokenmill.console import step

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
PYFUNC_CODE = Path(__file__).with_name("lm_pyfunc.py")  # logged as code, never pickled
PIP_REQUIREMENTS = ["tokenmill", "torch", "sentencepiece", "numpy", "mlflow"]


@dataclass
class Registration:
    name: str
    version: str
    aliases: list[str] = field(default_factory=list)
    decision: str = ""


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a list of prompts or a one-column frame
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([
            ParamSpec("mode", "string", "generate"),
            ParamSpec("max_new_tokens", "long", 64),
            ParamSpec("temperature", "double", 0.8),
            ParamSpec("top_k", "long", 50),
            ParamSpec("seed", "long", 0),
        ]),
    )


def existing_version(client, name: str, run_id: str):
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.run_id == run_id:
            return mv
    return None


def champion_candidate(client, name: str) -> Candidate | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return Candidate(mv.version, float(mv.tags.get("val_bpb", "nan")), mv.tags.get("eval_set_sha256", ""))


def log_lm(run_id: str, weights: Path, tokenizer: Path, gpt_config: dict, manifest_path: Path):
    """Log the pyfunc (as code) with weights, tokenizer and config as artifacts."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps({"gpt": gpt_config}))
        mlflow.log_artifact(str(manifest_path), "data")
        mlflow.log_artifact(str(tokenizer), "data")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(weights), "tokenizer": str(tokenizer), "config": str(config_path)},
            signature=model_signature(),
            pip_requirements=PIP_REQUIREMENTS,
        )


@task(name="register", retries=2, retry_delay_seconds=[2, 10], retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def register_candidate(
    run_id: str, weights: Path, gpt_config: dict, manifest_path: Path,
    metrics: dict, model_name: str, min_improvement: float,
) -> Registration:
    """Register the run's model as a new version (once), then apply the promotion gate."""
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = existing_version(client, model_name, run_id)
    if mv is None:
        step(f"registering {model_name}")
        tokenizer = Path(manifest_path).parent / json.loads(Path(manifest_path).read_text())["tokenizer"]["path"]
        logged = log_lm(run_id, weights, tokenizer, gpt_config, manifest_path)
        if not client.search_registered_models(f"name='{model_name}'"):
            client.create_registered_model(model_name)
        mv = client.create_model_version(model_name, logged.model_uri, run_id=run_id)
    tags = {k: str(v) for k, v in metrics.items() if k.startswith("val_") or k == "eval_set_sha256"}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, mv.version, key, value)
    decision = gate(client, model_name, mv.version, metrics, min_improvement)
    aliases = client.get_model_version(model_name, mv.version).aliases
    registered = client.get_registered_model(model_name)
    aliases = sorted(a for a, v in registered.aliases.items() if str(v) == str(mv.version)) or list(aliases)
    return Registration(model_name, str(mv.version), aliases, decision.reason)


def gate(client, name: str, version: str, metrics: dict, min_improvement: float) -> Decision:
    """Challenger always; champion only when the gate says so, keeping the old one as previous."""
    challenger = Candidate(version, float(metrics["val_bpb"]), str(metrics["eval_set_sha256"]))
    champion = champion_candidate(client, name)
    if champion is not None and champion.version == version:
        return Decision(True, "already champion")
    try:
        decision = decide(challenger, champion, min_improvement)
    except IncomparableModels as exc:
        decision = Decision(False, f"{exc}; not compared, so not promoted")
    client.set_registered_model_alias(name, CHALLENGER, version)
    if decision.promote:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion.version)
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion.decision", "promoted" if decision.promote else "kept-challenger")
    client.set_model_version_tag(name, version, "promotion.reason", decision.reason)
    return decision


def list_versions(name: str) -> list[tuple[str, ...]]:
    """Rows of (version, aliases, val_bpb, val_loss, decision, created) for `tokenmill models`."""
    import datetime

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tokenmill.errors import TokenmillError

    client = MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise TokenmillError(f"no registered model '{name}' yet; run `tokenmill run` first") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in registered.aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
        created = datetime.datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
        rows.append((
            str(mv.version), ", ".join(sorted(by_version.get(str(mv.version), []))),
            mv.tags.get("val_bpb", "")[:7], mv.tags.get("val_loss", "")[:7],
            mv.tags.get("promotion.decision", ""), created,
        ))
    return rows
