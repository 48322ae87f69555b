"""Manual promotion as a flow, so it runs on a Prefect server with an audit trail.

    tokenmill promote VERSION [--force]      # the same logic from the command line

`model_name` picks the registered model (tokenmill-classifier for the classifier); the gate
compares the metric each version records as `gate_metric` (val_bpb or macro_f1).
"""

from __future__ import annotations

from prefect import flow

from tasks.registry import promote_task
from tokenmill import runtime


@flow(name="tokenmill-promote", log_prints=False)
def promote_model(
    version: str, force: bool = False, model_name: str = "tokenmill-lm", min_improvement: float = 0.005
) -> str:
    runtime.configure()  # in a worker process too: MLflow's URI from TOKENMILL_HOME unless set
    decision = promote_task(model_name, version, min_improvement, force)
    return decision.reason
