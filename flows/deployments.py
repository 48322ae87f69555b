"""The deployments, defined once in code for `tokenmill serve` (process-based, no work
pool) and mirrored in deploy/prefect.yaml for work-pool deployments.

- nightly-retrain: a cron schedule, corpus and preset as parameters, warm-started from the champion;
- retrain-on-corpus-update: triggered by the `tokenmill.corpus.updated` event;
- promote: run by hand (`model_name=tokenmill-classifier` for the classifier);
- gc: a weekly clean-up of the state dir (`tokenmill gc`), keeping what kept versions need.

A labelled corpus trains a classifier (its catalog entry's task) unless `task` says otherwise;
the nightly warm start then continues from the classifier's own champion.
"""

from __future__ import annotations

from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from flows.gc import gc
from flows.pipeline import run_pipeline
from flows.promote import promote_model
from tasks.run.events import CORPUS_UPDATED

NIGHTLY_CRON = "0 3 * * *"
GC_CRON = "0 4 * * 0"  # Sundays, after that night's retrain


def corpus_update_trigger() -> DeploymentEventTrigger:
    return DeploymentEventTrigger(
        name="corpus-updated",
        match={"prefect.resource.id": "tokenmill.corpus.*"},
        expect={CORPUS_UPDATED},
        parameters={"corpus": "{{ event.payload.corpus }}"},
    )


def deployments(corpus: str, preset: str, cron: str | None = NIGHTLY_CRON, task: str | None = None):
    params = {"corpus": corpus, "preset": preset, **({"task": task} if task else {})}
    return [
        run_pipeline.to_deployment(
            name="nightly-retrain", cron=cron, parameters={**params, "warm_start": True}, tags=["tokenmill"]
        ),
        run_pipeline.to_deployment(
            name="retrain-on-corpus-update", parameters=params, triggers=[corpus_update_trigger()], tags=["tokenmill"]
        ),
        promote_model.to_deployment(name="promote", tags=["tokenmill"]),
        gc.to_deployment(name="gc", cron=GC_CRON, tags=["tokenmill"]),
    ]


def serve_all(
    corpus: str = "python-stdlib", preset: str = "default", cron: str | None = NIGHTLY_CRON, task: str | None = None
) -> None:
    """Register the deployments with the Prefect server and run their flow runs in this process."""
    serve(*deployments(corpus, preset, cron, task), print_starting_message=True)


if __name__ == "__main__":
    serve_all()
