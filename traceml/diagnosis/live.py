"""The live verdict: the diagnosis of the last few seconds of steps, so that a change (a rank that
slows down, a loader that stalls) is named within seconds of its onset instead of after the
100-step window has turned over.  Pure: the window is chosen from the rows' own timestamps.
"""

from __future__ import annotations

import numpy as np

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.engine import diagnose
from traceml.diagnosis.findings import Finding
from traceml.store import StoreView


def live_window_steps(view: StoreView) -> int:
    """Steps the slowest-stepping rank finished in the last LIVE_WINDOW_S seconds of its rows,
    clamped to [LIVE_MIN_STEPS, RECENT_STEPS]."""
    counts = []
    for r in view.table_ranks("step_time"):
        ts = np.asarray(view.columns("step_time", r)["ts_ns"], np.int64)
        if not len(ts):
            continue
        newest = int(ts.max())
        counts.append(int((ts > newest - int(th.LIVE_WINDOW_S * 1e9)).sum()))
    n = min(counts) if counts else th.RECENT_STEPS
    return max(th.LIVE_MIN_STEPS, min(th.RECENT_STEPS, n))


def live_verdict(view: StoreView) -> Finding | None:
    """The primary finding over the live window (None before any step)."""
    if not view.has("step_time"):
        return None
    return diagnose(view, last_n=live_window_steps(view)).primary
