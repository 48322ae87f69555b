"""Training stage: a manifest and a config in, trained weights and their metrics out.

`stage` is the Prefect task; `launch` runs the loop in this process or on torchrun ranks;
`trainer` is the loop itself, which imports neither Prefect nor MLflow.
"""

from tasks.core.exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"train_model": "stage", "start_tokenizer": "stage"})
__all__ = ["start_tokenizer", "train_model"]
