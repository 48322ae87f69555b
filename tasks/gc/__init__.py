"""What `tokenmill gc` keeps and removes from the state dir: a pure decision, then the removals."""

from tasks.core.exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"collect_garbage": "collect"})
__all__ = ["collect_garbage"]
