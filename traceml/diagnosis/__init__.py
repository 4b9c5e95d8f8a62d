"""Diagnosis: pure functions from a :class:`~traceml.store.StoreView` to findings (``diagnose``, ``build_summary``).

Same answer live, in replay and in reports: no clock, no I/O.  Rules and thresholds: docs/diagnosis.md.
"""

from traceml.diagnosis.engine import diagnose
from traceml.diagnosis.findings import (
    COMPUTE_BOUND,
    H2D_BOUND,
    HEALTHY,
    INPUT_BOUND,
    INSUFFICIENT_DATA,
    KINDS,
    LOW_GPU_UTILIZATION,
    MEMORY_CREEP,
    REGION_HEAVY,
    RESIDUAL_HEAVY,
    SEVERITIES,
    STRAGGLER,
    Diagnosis,
    Finding,
    Severity,
    Window,
)
from traceml.diagnosis.steps import StepData, job_series, step_data, warmup_count
from traceml.diagnosis.summary import SCHEMA_VERSION, build_summary, summary_lines, traceml_cost_text

__all__ = [
    "COMPUTE_BOUND",
    "H2D_BOUND",
    "HEALTHY",
    "INPUT_BOUND",
    "INSUFFICIENT_DATA",
    "KINDS",
    "LOW_GPU_UTILIZATION",
    "MEMORY_CREEP",
    "REGION_HEAVY",
    "RESIDUAL_HEAVY",
    "SCHEMA_VERSION",
    "SEVERITIES",
    "STRAGGLER",
    "Diagnosis",
    "Finding",
    "Severity",
    "StepData",
    "Window",
    "build_summary",
    "diagnose",
    "job_series",
    "step_data",
    "summary_lines",
    "traceml_cost_text",
    "warmup_count",
]
