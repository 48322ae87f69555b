"""Evaluation stage: a model scored on the frozen eval set of its manifest, plus a report.

`stage` is the Prefect task and the cache around it; `lm` and `classifier` evaluate each task;
`report` writes what a person reads.
"""

from tasks.core.exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"evaluate_model": "stage"})
__all__ = ["evaluate_model"]
