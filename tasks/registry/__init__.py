"""Registry stage, the only code that touches the MLflow model registry: register a candidate,
gate it, promote or roll back, list versions, export.

`versions` holds the registry calls and the Prefect tasks; `promotion` the pure gate;
`model_store` logging and downloading a model; `lm_pyfunc`, `classifier_pyfunc` the wrappers
logged with each model; `export` the Hugging Face checkpoint.
"""

from tasks.core.exports import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "register_candidate": "versions",
        "start_model_task": "versions",
        "promote_task": "versions",
        "registered_versions_task": "versions",
    },
)
__all__ = ["promote_task", "registered_versions_task", "register_candidate", "start_model_task"]
