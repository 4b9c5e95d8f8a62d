"""Views: pure functions ``StoreView -> view model`` (small frozen dataclasses): no clock, no I/O,
no drawing ("now" is ``view.latest_ns``).  ``live`` is the dashboard, ``final`` the end-of-run
summary screen; renderers draw the models, drivers decide when to take a snapshot.
"""

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

__all__ = [
    "DEFAULT_WINDOW_STEPS",
    "FinalModel",
    "FindingLine",
    "GpuRow",
    "LiveModel",
    "NodeRow",
    "PhaseRow",
    "RankRow",
    "RecordingInfo",
    "final_model",
    "findings_from_summary",
    "live_model",
]
