"""Views: pure functions ``StoreView -> view model`` (small frozen dataclasses): no clock, no I/O,
no drawing ("now" is ``view.latest_ns``).  ``live`` is the dashboard, ``final`` the end-of-run
summary screen, ``series`` / ``timeline`` / ``run_info`` the charts and panels of the web
dashboard and report; renderers draw the models, drivers decide when to take a snapshot.
"""

from traceml.views.downsample import MAX_POINTS, Trace, downsample_minmax
from traceml.views.final import FinalModel, FindingLine, final_model, findings_from_summary
from traceml.views.live import (
    DEFAULT_WINDOW_STEPS,
    GpuRow,
    LiveModel,
    NodeRow,
    PhaseRow,
    RankRow,
    RecordingInfo,
    live_model,
)
from traceml.views.rawsteps import quantiles_us
from traceml.views.run_info import RunInfo, run_info
from traceml.views.select import StepRange, TimeRange, origin_ns, selected_ranks
from traceml.views.series import (
    HEATMAP_BUCKETS,
    RankStat,
    RankSteps,
    StepBreakdown,
    rank_steps,
    step_breakdown,
    step_range_of,
    step_range_to_time,
)
from traceml.views.stepsource import JobFigures, StepGrid, StepSource
from traceml.views.stepsources import step_source
from traceml.views.timeline import MemorySeries, SystemSeries, Throughput, memory_series, system_series, throughput

__all__ = [
    "DEFAULT_WINDOW_STEPS",
    "HEATMAP_BUCKETS",
    "MAX_POINTS",
    "FinalModel",
    "FindingLine",
    "GpuRow",
    "JobFigures",
    "LiveModel",
    "MemorySeries",
    "NodeRow",
    "PhaseRow",
    "RankRow",
    "RankStat",
    "RankSteps",
    "RecordingInfo",
    "RunInfo",
    "StepBreakdown",
    "StepGrid",
    "StepRange",
    "StepSource",
    "SystemSeries",
    "Throughput",
    "TimeRange",
    "Trace",
    "downsample_minmax",
    "final_model",
    "findings_from_summary",
    "live_model",
    "memory_series",
    "origin_ns",
    "quantiles_us",
    "rank_steps",
    "run_info",
    "selected_ranks",
    "step_breakdown",
    "step_range_of",
    "step_range_to_time",
    "step_source",
    "system_series",
    "throughput",
]
