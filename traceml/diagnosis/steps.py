"""Step rows as the rules see them: re-exported from :mod:`traceml.views.steps`, where every
view, the summary and the rules share one selection of steps (failed rows and warm-up removed)."""

from traceml.views.steps import (
    COMPUTE_PHASES,
    ZERO_WHEN_MISSING,
    RankSteps,
    StepData,
    job_series,
    step_data,
    union_sorted,
    warmup_count,
)

__all__ = [
    "COMPUTE_PHASES",
    "ZERO_WHEN_MISSING",
    "RankSteps",
    "StepData",
    "job_series",
    "step_data",
    "union_sorted",
    "warmup_count",
]
