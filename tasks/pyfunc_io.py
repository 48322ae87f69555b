"""Kept for models registered before 2026-11-29, whose logged wrapper runs
`from tasks.pyfunc_io import texts_of`. New code: `tasks.modeling.pyfunc_io`."""

from tasks.modeling.pyfunc_io import texts_of

__all__ = ["texts_of"]
