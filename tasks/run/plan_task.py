"""The plan as the flow's first task: `plan.plan_run`, validated inputs and the resolved config."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.run.plan import plan_run

plan_run_task = task(name="plan", cache_policy=NO_CACHE)(plan_run)
