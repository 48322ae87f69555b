"""Input handling shared by the logged pyfunc models (`lm_pyfunc.py`, `classifier_pyfunc.py`)."""

from __future__ import annotations

import numpy as np


def texts_of(model_input, column: str) -> list[str]:
    """The texts of a pyfunc input: a DataFrame (`column` when present, else its first column),
    an array, one string, or any iterable of values."""
    if hasattr(model_input, "columns"):
        name = column if column in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[name].tolist()]
    if isinstance(model_input, np.ndarray):
        return [str(v) for v in model_input.reshape(-1).tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]
