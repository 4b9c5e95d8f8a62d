"""User-facing instrumentation: ``trace_step``, ``trace_time``, ``trace_input``, ``init``, ``shutdown``.

Thin facade over :mod:`traceml.runtime`; importing it does not import torch.
"""

from __future__ import annotations

from traceml.runtime.api import init, shutdown, trace_input, trace_step, trace_time

__all__ = ["init", "shutdown", "trace_input", "trace_step", "trace_time"]
