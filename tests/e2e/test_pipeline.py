"""End to end: the whole flow on the real default corpus, tiny preset, embedded services.

One module-scoped state dir holds the shards, the MLflow database and the registry, so the
tests below read it in order: a first run makes a champion, a weak second run must not
replace it, and the registered model loads and predicts in a fresh process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from tokenmill import runtime


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    env = {
        "TOKENMILL_HOME": str(state),
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # the tiny runs are shorter than the 10 s default
        # As `tokenmill run` sets them (runtime.configure_env): the run loggers send INFO to Prefect's API.
        "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    runtime.quiet_framework_noise()
    with prefect_test_harness(server_startup_timeout=180):
        from flows.pipeline import run_pipeline

        first = run_pipeline(corpus="python-stdlib", preset="tiny")
        weak = run_pipeline(corpus="python-stdlib", preset="tiny", max_steps=3)
        again = run_pipeline(corpus="python-stdlib", preset="tiny")
        yield {"state": state, "first": first, "weak": weak, "again": again, "evaluation_of_first": _reevaluate(first)}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _reevaluate(summary):
    from tasks.evaluate.stage import evaluate
    from tasks.registry.model_store import download_model
    from tokenmill.config import resolve_config

    model = download_model(f"models:/tokenmill-lm/{summary['model_version']}")
    return evaluate(summary["manifest"], model, resolve_config("tiny").eval)


def test_first_run_registers_a_champion_that_learned_context(pipeline_env):
    from mlflow import MlflowClient

    first = pipeline_env["first"]
    assert first["model_name"] == "tokenmill-lm" and first["model_version"] == "1"
    assert "champion" in first["aliases"]
    # Below 0.8x the unigram entropy: the model uses context, not just token frequencies.
    assert first["val_loss"] < 0.8 * first["val_unigram_entropy"]

    client = MlflowClient()
    mv = client.get_model_version_by_alias("tokenmill-lm", "champion")
    assert str(mv.version) == "1"
    run = client.get_run(mv.run_id)
    assert {"val_loss", "val_ppl", "val_bpb"} <= set(run.data.metrics)
    assert run.data.params["preset"] == "tiny" and run.info.status == "FINISHED"
    assert len(client.get_metric_history(mv.run_id, "train_loss")) >= 10
    # What preprocessing dropped, with the run: the stdlib's generated codec tables are near-copies.
    manifest = json.loads(Path(first["manifest"]).read_text())
    near = manifest["dropped"]["near_duplicate"]
    assert run.data.metrics["data/dropped_near_duplicate"] == near["docs"] > 0
    assert run.data.metrics["data/bytes_dropped_near_duplicate"] == near["bytes"]
    logged = {a.path for a in client.list_artifacts(mv.run_id, "data/dropped")}
    assert "data/dropped/near_duplicate.jsonl" in logged


def test_shards_are_reused_and_a_weak_challenger_is_not_promoted(pipeline_env):
    from mlflow import MlflowClient

    first, weak = pipeline_env["first"], pipeline_env["weak"]
    assert weak["manifest"] == first["manifest"]
    manifest = json.loads(open(weak["manifest"]).read())
    assert manifest["stats"]["tokens"] > 1_000_000
    assert weak["model_version"] == "2" and weak["aliases"] == ["challenger"]
    assert (first["champion_version"], weak["champion_version"]) == ("1", "1")
    assert weak["val_bpb"] > first["val_bpb"]
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("tokenmill-lm", "champion").version) == "1"
    tags = client.get_model_version("tokenmill-lm", "2").tags
    assert tags["promotion.decision"] == "kept-challenger" and "does not beat" in tags["promotion.reason"]


def test_champion_loads_and_predicts_in_a_fresh_process(pipeline_env):
    script = textwrap.dedent(
        """
        import json, mlflow.pyfunc, pandas as pd
        m = mlflow.pyfunc.load_model("models:/tokenmill-lm@champion")
        text = m.predict(["def main(", "import os\\n"], params={"max_new_tokens": 24, "temperature": 0.0})
        df = m.predict(pd.DataFrame({"prompt": ["class A:"]}), params={"max_new_tokens": 8})
        bpb = m.predict(["def add(a, b):\\n    return a + b\\n"], params={"mode": "score"})
        print(json.dumps({"text": list(text), "df": list(df), "bpb": list(bpb)}))
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=pipeline_env["state"], timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["text"]) == 2 and all(isinstance(t, str) and t for t in result["text"])
    assert len(result["df"]) == 1
    assert 0.0 < result["bpb"][0] < 16.0


def test_run_records_lineage_artifacts_and_report(pipeline_env):
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(pipeline_env["first"]["mlflow_run_id"])
    assert run.data.tags["tokenmill.corpus"] == "python-stdlib"
    assert len(run.data.tags["tokenmill.corpus_fingerprint"]) == 64
    assert run.data.tags["prefect.flow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for d in ("eval", "data") for a in client.list_artifacts(run.info.run_id, d)}
    assert {
        "config.json",
        "eval/report.md",
        "eval/loss_curve.png",
        "eval/generations.json",
        "data/manifest.json",
        "data/tokenizer.model",
    } <= artifacts
    datasets = run.inputs.dataset_inputs
    assert datasets and datasets[0].dataset.name == "python-stdlib"
    lineage = {t.key: t.value for t in datasets[0].tags}
    assert lineage["corpus_fingerprint"] == run.data.tags["tokenmill.corpus_fingerprint"]
    assert len(lineage["manifest_sha256"]) == 64
    samples = pipeline_env["first"]["generations"]
    assert len(samples) == 5 and all(s["completion"].strip() for s in samples)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system


def test_stage_progress_and_the_summary_reach_the_prefect_run_logs(pipeline_env):
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    flow_run_id = MlflowClient().get_run(pipeline_env["first"]["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    APILogHandler().flush()
    messages, page = [], None
    with get_client(sync_client=True) as client:
        while page != []:  # the API returns at most 200 a call
            page = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(messages)
            )
            messages += [log.message for log in page]
    assert any(m.startswith("training on cpu") for m in messages), messages[:50]
    summary = next(m for m in messages if m.startswith("run summary"))
    assert "tokenmill-lm v1 (" in summary and "bits/byte" in summary and "promotion" in summary


def test_registration_is_idempotent_under_a_retry(pipeline_env):
    from mlflow import MlflowClient

    from tasks.registry.versions import register_candidate

    first = pipeline_env["first"]
    client = MlflowClient()
    before = len(client.search_model_versions("name='tokenmill-lm'"))
    evaluation = pipeline_env["evaluation_of_first"]
    again = register_candidate.fn(
        first["mlflow_run_id"], evaluation, first["manifest"], "python-stdlib", "tokenmill-lm", 0.005
    )
    assert again.version == first["model_version"]
    assert len(client.search_model_versions("name='tokenmill-lm'")) == before


def cli(*args: str, env_state) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENMILL_HOME": str(env_state)}
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_evaluate_any_version_from_the_command_line(pipeline_env):
    out = cli("evaluate", "models:/tokenmill-lm/2", "--json", env_state=pipeline_env["state"])
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["val_bpb"] == pytest.approx(pipeline_env["weak"]["val_bpb"], rel=1e-6)
    assert result["eval_set_sha256"] == pipeline_env["weak"]["eval_set_sha256"]


def test_promote_refuses_a_worse_model_then_force_and_rollback(pipeline_env):
    from mlflow import MlflowClient

    state = pipeline_env["state"]
    refused = cli("promote", "2", env_state=state)
    assert refused.returncode == 2 and "not promoted" in refused.stderr and "--force" in refused.stderr
    forced = cli("promote", "2", "--force", env_state=state)
    assert forced.returncode == 0, forced.stderr
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("tokenmill-lm", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("tokenmill-lm", "previous-champion").version) == "1"
    who = client.get_model_version("tokenmill-lm", "2").tags["promotion.forced_by"]
    assert who.endswith("(no registry login)") and "@" in who  # the local user, without a registry login
    back = cli("rollback", env_state=state)
    assert back.returncode == 0, back.stderr
    assert str(client.get_model_version_by_alias("tokenmill-lm", "champion").version) == "1"
    listing = cli("models", env_state=state)
    assert listing.returncode == 0 and "champion" in listing.stdout + listing.stderr


def test_each_run_leaves_a_summary_and_shard_table_in_prefect(pipeline_env):
    import httpx
    from prefect.settings import PREFECT_API_URL

    def read(key: str) -> list[dict]:
        body = {"artifacts": {"key": {"any_": [key]}}, "limit": 20}
        response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    summaries, tables = read("tokenmill-run-summary"), read("tokenmill-shards")
    assert len(summaries) >= 2 and len(tables) >= 2
    assert any("tokenmill-lm v1" in a["data"] and "val_bpb" in a["data"] for a in summaries)


def test_unchanged_inputs_reuse_every_stage_and_register_nothing_new(pipeline_env):
    from mlflow import MlflowClient

    first, again = pipeline_env["first"], pipeline_env["again"]
    assert again["manifest"] == first["manifest"]
    assert again["model_version"] == "1" and "champion" in again["aliases"]
    assert again["val_bpb"] == first["val_bpb"]
    client = MlflowClient()
    assert len(client.search_model_versions("name='tokenmill-lm'")) == 2  # v1 and the weak v2 only
    run = client.get_run(again["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_id != first["mlflow_run_id"]
    # The cached run still records the training curve it reused.
    assert len(client.get_metric_history(again["mlflow_run_id"], "train_loss")) >= 10


def test_verified_shards_show_as_a_cached_task_in_prefect(pipeline_env):
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"task_runs": {"name": {"like_": "preprocess"}}, "limit": 50}
    response = httpx.post(f"{PREFECT_API_URL.value()}/task_runs/filter", json=body, timeout=30)
    response.raise_for_status()
    states = [run["state"]["name"] for run in response.json()]
    assert "Cached" in states  # the third run on unchanged shards never started Dask


def test_warm_start_continues_from_the_champion(pipeline_env):
    """Runs last: a scheduled retrain starts from the champion's weights and tokenizer."""
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline

    warm = run_pipeline(corpus="python-stdlib", preset="tiny", warm_start=True, max_steps=10)
    client = MlflowClient()
    run = client.get_run(warm["mlflow_run_id"])
    assert run.data.tags["tokenmill.init_from"] == "models:/tokenmill-lm/1"
    first_warm = client.get_metric_history(warm["mlflow_run_id"], "train_loss")[0].value
    first_cold = client.get_metric_history(pipeline_env["weak"]["mlflow_run_id"], "train_loss")[0].value
    # Ten steps on from the champion start near its loss; a cold start begins near ln(vocab).
    assert first_warm < 0.8 * first_cold
    assert warm["eval_set_sha256"] == pipeline_env["first"]["eval_set_sha256"]
