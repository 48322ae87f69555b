"""The run around the stages: its plan, its MLflow run (tracking), its summary and the events
that trigger it. The stages below use only `mlflow_runs.MlflowTracker`, through the small
tracking interface `tasks.train.trainer.Tracker`.
"""

from tasks.core.exports import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "plan_run_task": "plan_task",
        "start_run": "tracking",
        "end_run": "tracking",
        "log_data": "tracking",
        "run_tags": "tracking",
        "run_summary": "summary",
        "publish_summary": "summary",
    },
)
__all__ = ["end_run", "log_data", "plan_run_task", "publish_summary", "run_summary", "run_tags", "start_run"]
