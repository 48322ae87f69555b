"""The main flow: corpus -> shards -> trained model -> evaluation -> registered version.

    tokenmill run python-stdlib            # or: python -m flows.pipeline
    tokenmill run stdlib-packages --task classify --init-from models:/tokenmill-lm@champion

The task (`lm` or `classify`, from the corpus entry unless `task` overrides it) picks the
shards, the network, the metrics and the registered model; the wiring is the same.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from tasks.evaluate import evaluate_model
from tasks.preprocess import preprocess_corpus
from tasks.registry import register_candidate, start_model_task
from tasks.run import end_run, log_data, plan_run_task, publish_summary, run_summary, run_tags, start_run
from tasks.train import start_tokenizer, train_model
from tokenmill import runtime


@flow(name="tokenmill-run", log_prints=False)
def run_pipeline(
    corpus: str = "python-stdlib",
    preset: str = "default",
    overrides: list[str] | None = None,
    catalog: str | None = None,
    max_steps: int | None = None,
    refresh: bool = False,
    init_from: str | None = None,
    warm_start: bool = False,
    task: str | None = None,
) -> dict:
    # A worker process (a work pool, `tokenmill serve`) starts here, not in the CLI: without this,
    # MLflow and the state dir would resolve against the worker's working directory.
    runtime.configure()
    plan = plan_run_task(corpus, preset, overrides, catalog, max_steps, task)
    cfg = plan.config
    start, start_uri = start_model_task(init_from, warm_start, cfg.registry.model_name, plan.models_root, cfg.model)
    tokenizer = start_tokenizer(start, cfg, plan.shards_root, start_uri)  # a warm start keeps its model's tokenizer
    manifest = preprocess_corpus(
        plan.corpus,
        cfg.tokenizer,
        cfg.data,
        plan.shards_root,
        plan.dask_address,
        refresh=refresh,
        reuse_tokenizer=tokenizer,
        classify=cfg.classify,
        task=cfg.task,
    )
    tags = run_tags(plan.corpus.name, plan.corpus.fingerprint, flow_run.get_id(), start_uri, cfg.task)
    run_id = start_run(cfg.registry.experiment, f"{plan.corpus.name}-{cfg.preset}", cfg.model_dump(), tags)
    try:
        log_data(run_id, manifest)
        trained = train_model(manifest, cfg, plan.models_root, run_id, refresh=refresh, init=start)
        evaluation = evaluate_model(manifest, trained, cfg.eval, run_id, refresh=refresh)
        registered = register_candidate(
            run_id, evaluation, manifest, plan.corpus.name, cfg.registry.model_name, cfg.registry.min_improvement
        )
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    end_run(run_id, "FINISHED")
    summary = run_summary(cfg.task, manifest, run_id, registered, evaluation, start_uri)
    publish_summary(summary)
    return summary


if __name__ == "__main__":
    run_pipeline()
