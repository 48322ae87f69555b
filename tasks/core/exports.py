"""Lazy package exports, so that a stage's worker code imports without its orchestration.

A stage package names its Prefect tasks in its `__init__` (`from tasks.train import
train_model`), but the modules below it run where Prefect is not wanted: on Dask workers,
on torchrun ranks, and in `tokenmill train`, which must work without Prefect or MLflow
installed. Python runs a package's `__init__` before any of its modules, so the names are
resolved on first use (PEP 562) instead of imported at the top.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: each exported name maps to the module (relative
    to the package) that defines it."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
