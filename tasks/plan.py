"""The plan stage: validate inputs and resolve the run's config (see tokenmill/plan.py)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tokenmill.plan import RunPlan, plan_run

plan_run_task = task(name="plan", cache_policy=NO_CACHE)(plan_run)

__all__ = ["RunPlan", "plan_run_task"]
