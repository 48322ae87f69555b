"""Kept for classifiers registered before 2026-11-29, whose logged wrapper runs
`from tasks.shards import PAD_ID`. New code: `tasks.core.shards`."""

from tasks.core.shards import PAD_ID

__all__ = ["PAD_ID"]
