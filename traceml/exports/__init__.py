"""Exports into the tools teams already run: Prometheus textfile, OpenTelemetry (OTLP), W&B, MLflow.

Each takes the run summary and owns its I/O; foreign packages are optional extras imported on use
(:class:`MissingDependencyError` with the pip line).  Never imported by the ranks.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from traceml.errors import MissingDependencyError

__all__ = ["require"]


def require(module: str, extra: str, packages: str) -> ModuleType:
    """Import ``module`` or fail with the pip line that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"this needs the {module.split('.')[0]!r} package, which is not installed (import {module} failed: {exc});"
            f" install it with: pip install 'traceml-recorder[{extra}]' (or: pip install {packages})"
        ) from exc
