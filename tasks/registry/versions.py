"""The only module that touches the MLflow model registry: register, gate, promote, roll back.

Every candidate becomes a version with alias `challenger`, tagged with its eval metrics, its
eval-set sha and its task's gate metric (`gate_metric`: val_bpb for a language model, macro_f1
for a classifier). It becomes `champion` only through the pure gate in `tasks/registry/promotion.py`;
the champion it replaces keeps `previous-champion`. Registration is idempotent: under a lock
per registered model (tokenmill/locks.py), a version is looked up by its candidate id (the weights
and eval set it was scored on) first, so neither a retried task nor an overlapping run
duplicates it, and its gate runs once. Processes on other machines, which the lock does not
reach, settle a race on the lowest version (`create_version_once`).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core.manifest import content_key
from tasks.core.policy import TRANSIENT_RETRIES
from tasks.core.spec import LM, spec_for_gate, task_spec
from tasks.modeling.evaluation import Evaluation
from tasks.modeling.local_model import LocalModel
from tasks.registry.model_store import log_model
from tasks.registry.promotion import Candidate, Decision, IncomparableModels, decide
from tokenmill.config import ModelConfig
from tokenmill.console import step
from tokenmill.credentials import raise_refusal, redact, require_model_permission
from tokenmill.errors import TokenmillError
from tokenmill.locks import exclusive, in_use

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


@dataclass
class Registration:
    name: str
    version: str
    aliases: list[str] = field(default_factory=list)
    decision: str = ""
    champion: str | None = None  # the version holding `champion` after the gate; None when none does


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


CANDIDATE_TAG = "tokenmill.candidate_id"
GATE_TAG = "gate_metric"
# The metric columns of `tokenmill models`, by gate metric.


def candidate_id(evaluation: Evaluation) -> str:
    """Names a candidate by content: the same weights scored on the same eval set."""
    return content_key(evaluation.weights_sha256, evaluation.eval_set_sha256)


def candidate_versions(client, name: str, cid: str) -> list:
    """The versions tagged with candidate id `cid`, lowest first."""
    found = client.search_model_versions(f"name='{name}' and tag.`{CANDIDATE_TAG}` = '{cid}'")
    return sorted(found, key=lambda mv: int(mv.version))


def existing_version(client, name: str, cid: str):
    """The candidate's version: the lowest, should a race have left more than one."""
    return next(iter(candidate_versions(client, name, cid)), None)


def create_version_once(client, name: str, logged, run_id: str, cid: str):
    """Create the candidate's version; when another machine created one for the same candidate
    at the same moment (a file lock does not reach it), the lowest version wins and a higher one
    this call created is deleted, so every racer ends with the same single version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mine = client.create_model_version(
        name, logged.model_uri, run_id=run_id, model_id=logged.model_id, tags={CANDIDATE_TAG: cid}
    )
    winner = existing_version(client, name, cid)
    if str(winner.version) != str(mine.version):
        client.delete_model_version(name, str(mine.version))
    return winner


def candidate(client, name: str, version: str) -> Candidate:
    mv = client.get_model_version(name, version)
    metric = mv.tags.get(GATE_TAG, LM.gate.metric)  # versions registered before the tag were all language models
    return Candidate(
        str(mv.version),
        _number(mv.tags.get(metric)),
        mv.tags.get("eval_set_sha256", ""),
        mv.tags.get("generations_ok", "true") == "true",
        metric,
    )


def _number(value: str | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        raise_refusal(exc)
        return None


def aliases_of(client, name: str, version: str) -> list[str]:
    # search_model_versions returns empty aliases on the SQL store; the registered model has them.
    registered = client.get_registered_model(name)
    return sorted(a for a, v in registered.aliases.items() if str(v) == str(version))


@task(
    name="register",
    **TRANSIENT_RETRIES,
    cache_policy=NO_CACHE,
)
def register_candidate(
    run_id: str, evaluation: Evaluation, manifest_path: Path, corpus_name: str, model_name: str, min_improvement: float
) -> Registration:
    """Register the evaluated model as a new version (once), tag it, then apply the promotion gate
    (once: a version found already gated keeps its recorded decision)."""
    from mlflow import get_tracking_uri

    cid = candidate_id(evaluation)
    client = _client()
    with exclusive(f"registry {get_tracking_uri()} {model_name}", f"registering {model_name}"):
        mv = existing_version(client, model_name, cid)
        if mv is None:
            step(f"registering {model_name}")
            with in_use(Path(manifest_path).resolve().parent):  # its manifest and tokenizer go into the model
                logged = log_model(run_id, evaluation.model, manifest_path, corpus_name, evaluation.weights_sha256)
            mv = create_version_once(client, model_name, logged, run_id, cid)
        else:
            step(f"{model_name} v{mv.version} already holds these weights for this eval set: reusing it")
        version = str(mv.version)
        reason = mv.tags.get("promotion.reason")
        if reason is None:  # new, or an earlier attempt failed before its gate
            for key, value in version_tags(evaluation, manifest_path).items():
                client.set_model_version_tag(model_name, version, key, value)
            reason = gate(client, model_name, version, min_improvement).reason
        return Registration(
            model_name,
            version,
            aliases_of(client, model_name, version),
            reason,
            alias_version(client, model_name, CHAMPION),
        )


def version_tags(evaluation: Evaluation, manifest_path: Path) -> dict[str, str]:
    """What a version records for the gate and for `tokenmill models`: its task, gate metric,
    headline metrics (per-class ones stay on the run) and what it was scored on."""
    spec = task_spec(evaluation.task)
    tags = {k: str(v) for k, v in evaluation.metrics.items() if "." not in k}
    tags.update(
        task=spec.name,
        eval_set_sha256=evaluation.eval_set_sha256,
        weights_sha256=evaluation.weights_sha256,
        eval_max_rows=str(evaluation.eval_max_rows),
        manifest=str(manifest_path),
        tokenizer_sha256=evaluation.model.tokenizer_sha256,
    )
    tags[GATE_TAG] = spec.gate.metric
    if spec.generates:  # sample generations are a language model's absolute check
        tags["generations_ok"] = str(evaluation.generations_ok).lower()
    return tags


def gate(client, name: str, version: str, min_improvement: float) -> Decision:
    """Challenger always; champion only when the gate says so."""
    current = alias_version(client, name, CHAMPION)
    if current == version:
        return Decision(True, "already champion")
    challenger = candidate(client, name, version)
    champion = candidate(client, name, current) if current else None
    try:
        decision = decide(challenger, champion, min_improvement)
    except IncomparableModels as exc:
        decision = Decision(False, f"{exc}; not compared, so not promoted")
    client.set_registered_model_alias(name, CHALLENGER, version)
    if decision.promote:
        _crown(client, name, version, current)
    _record(client, name, version, decision, "promoted" if decision.promote else "kept-challenger")
    return decision


def _crown(client, name: str, version: str, current: str | None) -> None:
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)


def _record(client, name: str, version: str, decision: Decision, outcome: str) -> None:
    client.set_model_version_tag(name, version, "promotion.decision", outcome)
    client.set_model_version_tag(name, version, "promotion.reason", decision.reason)


def promote(name: str, version: str, min_improvement: float, force: bool = False) -> Decision:
    """Make `version` champion if it passes the gate against the current one (or `force`)."""
    client = _client()
    _require_version(client, name, version)
    # Overriding the gate is for an owner of the model (MANAGE), and goes on the record.
    who = require_model_permission(
        name, *(("MANAGE", "force a promotion in") if force else ("EDIT", "promote versions of"))
    )
    current = alias_version(client, name, CHAMPION)
    if current == version:
        raise TokenmillError(f"{name} v{version} is already champion")
    if force:
        over = f" over champion v{current}" if current else ""
        decision = Decision(True, f"forced by {who}{over}")
        client.set_model_version_tag(name, version, "promotion.forced_by", who)
    else:
        champion = candidate(client, name, current) if current else None
        try:
            decision = decide(candidate(client, name, version), champion, min_improvement)
        except IncomparableModels as exc:
            raise TokenmillError(f"{exc}; re-evaluate both on one manifest, or pass --force") from None
        if not decision.promote:
            _record(client, name, version, decision, "kept-challenger")
            raise TokenmillError(f"not promoted: {decision.reason}; pass --force to override")
    _crown(client, name, version, current)
    _record(client, name, version, decision, "promoted")
    return decision


def rollback(name: str) -> tuple[str, str]:
    """Champion back to `previous-champion`; returns (demoted, restored) versions."""
    client = _client()
    current, previous = alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS)
    if previous is None or current is None:
        raise TokenmillError(f"{name} has no previous-champion to roll back to")
    require_model_permission(name, "EDIT", "roll back")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    _record(client, name, current, Decision(False, f"rolled back to v{previous}"), "rolled-back")
    return current, previous


def _require_version(client, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise_refusal(exc)
        raise TokenmillError(f"{name} has no version {version}; see `tokenmill models`") from None


def registered_versions() -> list[dict]:
    """Every registered version (`all_versions`), or none when the default SQLite registry was
    never created; a registry that cannot be read is an error, since then nothing is known to be unused."""
    from tokenmill.runtime import services

    uri = services().mlflow_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []
    try:
        return all_versions()
    except Exception as exc:
        raise_refusal(exc)
        raise TokenmillError(
            f"cannot read the model registry at {redact(uri)} ({type(exc).__name__}); gc removed nothing"
        ) from None


registered_versions_task = task(name="registered-versions", cache_policy=NO_CACHE)(registered_versions)


def all_versions() -> list[dict]:
    """Every version of every registered model, with what `tokenmill gc` keeps by: its aliases,
    run id, `manifest` and `weights_sha256` tags and creation time (seconds)."""
    client = _client()
    out, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        for registered in page:
            aliases: dict[str, list[str]] = {}
            for alias, version in registered.aliases.items():
                aliases.setdefault(str(version), []).append(alias)
            for mv in client.search_model_versions(f"name='{registered.name}'"):
                out.append(
                    {
                        "model": registered.name,
                        "version": int(mv.version),
                        "run_id": mv.run_id or "",
                        "manifest": mv.tags.get("manifest", ""),
                        "weights_sha256": mv.tags.get("weights_sha256", ""),
                        "aliases": sorted(aliases.get(str(mv.version), [])),
                        "created": (mv.creation_timestamp or 0) / 1000,
                    }
                )
        token = page.token
        if not token:
            return out


def list_versions(name: str) -> tuple[list[str], list[tuple[str, ...]]]:
    """Columns and rows of `tokenmill models`: version, aliases, the two headline metrics of the
    model's gate (val_bpb, val_loss for a language model; macro_f1, accuracy for a classifier),
    decision and creation time."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        raise_refusal(exc)
        raise TokenmillError(f"no registered model '{name}' yet; run `tokenmill run` first") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in registered.aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version))
    gate_metric = next((mv.tags[GATE_TAG] for mv in reversed(versions) if GATE_TAG in mv.tags), LM.gate.metric)
    metrics = spec_for_gate(gate_metric).listed
    rows = []
    for mv in versions:
        created = datetime.datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
        rows.append(
            (
                str(mv.version),
                ", ".join(sorted(by_version.get(str(mv.version), []))),
                *(_short(mv.tags.get(m)) for m in metrics),
                mv.tags.get("promotion.decision", ""),
                created,
            )
        )
    return ["version", "aliases", *metrics, "decision", "created"], rows


def _short(value: str | None) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{number:.4f}" if math.isfinite(number) else str(number)


def registered_version(model_uri: str):
    """The ModelVersion (tags, run id) that models:/NAME/VERSION or models:/NAME@ALIAS names."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        if not model_uri.startswith("models:/"):
            raise ValueError(model_uri)
        name, _, ref = model_uri.removeprefix("models:/").partition("/")
        if "@" in name:
            name, alias = name.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, ref)
    except (MlflowException, ValueError) as exc:
        raise_refusal(exc)
        raise TokenmillError(f"cannot resolve {model_uri}; use models:/NAME@ALIAS or models:/NAME/VERSION") from None


def recorded_evaluation(model_uri: str) -> tuple[str, int | None]:
    """The manifest and eval-set size a registered version was evaluated with (its tags)."""
    mv = registered_version(model_uri)
    manifest = mv.tags.get("manifest")
    if not manifest:
        raise TokenmillError(f"{model_uri} records no manifest; pass --shards PATH/manifest.json")
    rows = mv.tags.get("eval_max_rows")
    return manifest, int(rows) if rows else None


promote_task = task(
    name="promote",
    **TRANSIENT_RETRIES,
    cache_policy=NO_CACHE,
)(promote)


def start_model(
    init_from: str | None, warm_start: bool, model_name: str, dst_root: Path, model: ModelConfig | None = None
) -> tuple[LocalModel | None, str]:
    """The model a run continues from: `init_from` (a model URI, which must exist), or with
    `warm_start` the current champion when there is one. Returns (model or None, what it is).
    With `model`, the run's network shapes must match the start model's, checked here so that
    a mismatch stops the run before any preprocessing or training."""
    from tasks.registry.model_store import download_model

    if init_from:
        uri = init_from
    elif warm_start:
        version = alias_version(_client(), model_name, CHAMPION)
        if version is None:
            step(f"warm start: {model_name} has no champion yet, training from scratch")
            return None, ""
        uri = f"models:/{model_name}/{version}"
    else:
        return None, ""
    dst = Path(dst_root) / "init" / content_key(uri, datetime.datetime.now().isoformat())[:12]
    dst.mkdir(parents=True, exist_ok=True)
    local = download_model(uri, dst)
    if model is not None:
        require_shapes(uri, local.gpt_config, model)
    step(f"warm start from {uri}")
    return local, uri


def require_shapes(uri: str, source: dict, model: ModelConfig) -> None:
    """The backbone shapes a warm start needs to match (the vocabulary follows the reused tokenizer)."""
    diffs = [
        f"{name} {source.get(name)} (source) vs {getattr(model, name)} (this run)"
        for name in ("n_layer", "n_head", "n_embd")
        if source.get(name) != getattr(model, name)
    ]
    if diffs:
        fix = " ".join(f"--set model.{name}={source.get(name)}" for name in ("n_layer", "n_head", "n_embd"))
        raise TokenmillError(
            f"cannot warm-start from {uri}: {'; '.join(diffs)}; "
            f"use the preset it was trained with or {fix}, or train from scratch"
        )


start_model_task = task(
    name="resolve-start-model",
    **TRANSIENT_RETRIES,
    cache_policy=NO_CACHE,
)(start_model)
