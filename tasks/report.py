"""Kept for language models registered before 2026-11-29, whose logged wrapper runs
`from tasks.report import complete`. New code: `tasks.modeling.pyfunc_io`."""

from tasks.modeling.pyfunc_io import complete

__all__ = ["complete"]
