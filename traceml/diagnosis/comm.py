"""Communication-bound: DDP's gradient all-reduce that backward does not hide, and blocking
collectives called in the step (``step_comm``).

The job's exposed share is the smallest rank's (a straggler's wait is not communication's cost).  Pure.
"""

from __future__ import annotations

import numpy as np

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.findings import COMMUNICATION_BOUND, Finding
from traceml.diagnosis.step_rules import grade, ms, pct
from traceml.store import StoreView
from traceml.views.steps import StepData

TABLE = "step_comm"


def communication_bound(view: StoreView, data: StepData) -> Finding | None:
    """COMMUNICATION_BOUND when the exposed all-reduce share of every rank reaches COMM_WARN."""
    if not view.has(TABLE) or data.empty:
        return None
    shares: dict[int, float] = {}
    exposed_med: list[float] = []
    comm_med: list[float] = []
    buckets: list[float] = []
    steps = 0
    for r in data.ranks:
        rs = data.per_rank[r]
        if not len(rs.step) or view.rows(TABLE, r) == 0:
            continue
        cols = view.columns(TABLE, r)
        cstep = np.asarray(cols["step"], np.int64)
        keep = np.isin(cstep, rs.step)
        if not keep.any():
            continue
        exposed = np.asarray(cols["exposed_us"], np.float64)[keep]
        whole = rs.step_us[np.isin(rs.step, cstep[keep])]
        whole = whole[np.isfinite(whole)]
        if not len(whole) or whole.sum() <= 0:
            continue
        shares[r] = float(exposed.sum() / whole.sum())
        exposed_med.append(float(np.median(exposed)))
        comm_med.append(float(np.median(np.asarray(cols["comm_us"], np.float64)[keep])))
        buckets.append(float(np.median(np.asarray(cols["buckets"], np.float64)[keep])))
        steps = int(keep.sum()) if not steps else min(steps, int(keep.sum()))
    if not shares:
        return None
    least = min(shares, key=lambda r: shares[r])
    share = shares[least]
    severity = grade(share, th.COMM_WARN, th.COMM_CRITICAL, steps)
    if severity is None:
        return None
    step_med = float(np.median(np.concatenate([data.per_rank[r].step_us for r in shares])))
    n = len(shares)
    return Finding(
        kind=COMMUNICATION_BOUND,
        severity=severity,
        rank=None if n > 1 else least,
        summary=(
            f"communication-bound: all-reduce and collectives not hidden behind compute take {pct(share)} of step "
            f"time (the least of {n} rank{'s' if n > 1 else ''}); {ms(float(np.median(exposed_med)))} exposed of a "
            f"{ms(step_med)} step, {ms(float(np.median(comm_med)))} in {float(np.median(buckets)):.0f} "
            f"all-reduce buckets or collectives per step (larger buckets, fewer syncs or more compute per sync)"
        ),
        evidence={
            "share": share,
            "least_rank": least,
            "exposed_median_us": float(np.median(exposed_med)),
            "comm_median_us": float(np.median(comm_med)),
            "buckets_median": float(np.median(buckets)),
            "step_median_us": step_med,
            "warn_share": th.COMM_WARN,
            "critical_share": th.COMM_CRITICAL,
            "steps": steps,
            "ranks": n,
        },
    )
