"""traceml: a record-and-replay profiler for PyTorch training.

``with traceml.trace_step(model): ...`` marks a training step (under ``traceml run`` the only change a
script needs).  Importing traceml does not import torch; the rank runtime loads on first use.
"""

from __future__ import annotations

from typing import Any

from traceml._version import __version__

__all__ = ["__version__", "init", "shutdown", "summary", "trace_input", "trace_step", "trace_time"]


def __getattr__(name: str) -> Any:
    if name in ("trace_step", "trace_time", "trace_input", "init", "shutdown"):
        from traceml import decorators

        value = getattr(decorators, name)
        # bound here once: `traceml.trace_step(model)` in a loop then costs an attribute read,
        # not this function and an import statement every step
        globals()[name] = value
        return value
    if name == "summary":
        from traceml._summary import summary

        return summary
    raise AttributeError(f"module 'traceml' has no attribute {name!r}")
