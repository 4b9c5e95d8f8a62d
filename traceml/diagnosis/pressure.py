"""Resource rules: memory near capacity, memory imbalance between ranks, a saturated host CPU, a hot
GPU.  Each reads the sampled tables within the analysed window's time span; thresholds in
:mod:`traceml.diagnosis.thresholds`.  Pure: no clock, no I/O.
"""

from __future__ import annotations

import numpy as np

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.findings import GPU_THERMAL, HOST_SATURATION, MEMORY_IMBALANCE, MEMORY_PRESSURE, Finding
from traceml.diagnosis.step_rules import grade
from traceml.store import StoreView
from traceml.units import fmt_bytes
from traceml.views.steps import StepData


def _in_span(view: StoreView, table: str, rank: int, span: tuple[int, int] | None) -> dict[str, np.ndarray]:
    cols = view.columns(table, rank)
    ts = np.asarray(cols["ts_ns"], np.int64)
    keep = np.ones(len(ts), bool) if span is None else (ts >= span[0]) & (ts <= span[1])
    return {k: np.asarray(v)[keep] for k, v in cols.items() if k != "ts_ns" and not isinstance(v, list)}


def _p90(values: np.ndarray) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v) & (v >= 0)]
    return float(np.percentile(v, 90)) if len(v) else float("nan")


def _fullest(
    view: StoreView, table: str, used_col: str, total_col: str, span: tuple[int, int] | None, where: str
) -> tuple[float, int, float, float, int] | None:
    """(share, rank or node, used, total, samples) of the fullest rank (``where="rank"``) or node."""
    worst: tuple[float, int, float, float, int] | None = None
    for r in view.table_ranks(table):
        cols = _in_span(view, table, r, span)
        used, total = _p90(cols[used_col]), _p90(cols[total_col])
        if np.isfinite(used) and np.isfinite(total) and total > 0:
            share = used / total
            who = r if where == "rank" or not len(cols["node_rank"]) else int(cols["node_rank"][0])
            if worst is None or share > worst[0]:
                worst = (share, who, used, total, len(cols[total_col]))
    return worst


def memory_pressure(view: StoreView, data: StepData) -> list[Finding]:
    """GPU memory reserved, or host RAM used, near capacity (90th percentile of the window)."""
    span = data.time_range()
    out: list[Finding] = []
    cases = (
        (
            "gpu",
            "process",
            "gpu_reserved_bytes",
            "gpu_total_bytes",
            "rank",
            "GPU memory",
            "reserved",
            "an allocation spike may fail",
        ),
        (
            "host",
            "system",
            "ram_used_bytes",
            "ram_total_bytes",
            "node",
            "host RAM",
            "used",
            "swapping or the OOM killer are next",
        ),
    )
    for resource, table, used_col, total_col, where, what, verb, risk in cases:
        fullest = _fullest(view, table, used_col, total_col, span, where)
        if fullest is None:
            continue
        share, who, used, total, n = fullest
        sev = grade(share, th.MEM_PRESSURE_WARN, th.MEM_PRESSURE_CRITICAL, n)
        if sev is None:
            continue
        evidence: dict[str, float | int] = {"share": share, "used_bytes": used, "total_bytes": total}
        if where == "node":
            evidence["node_rank"] = who
        evidence["samples"] = n
        out.append(
            Finding(
                kind=MEMORY_PRESSURE,
                severity=sev,
                rank=who if where == "rank" else None,
                summary=(
                    f"{what} near capacity on {where} {who}: {fmt_bytes(used)} {verb} of {fmt_bytes(total)} "
                    f"({share * 100:.0f}%, 90th percentile); {risk}"
                ),
                evidence=evidence,
                labels={"resource": resource},
            )
        )
    return out


def _peaks(view: StoreView, data: StepData) -> tuple[str, dict[int, float]]:
    """Per-rank peak memory: GPU (per-step peaks, else sampled allocation), else host RSS."""
    peaks: dict[int, float] = {}
    for r in view.table_ranks("step_memory"):
        v = np.asarray(view.columns("step_memory", r)["peak_alloc_bytes"], np.float64)
        v = v[v >= 0]
        if len(v):
            peaks[r] = float(v.max())
    if len(peaks) >= 2:
        return "gpu", peaks
    span = data.time_range()
    gpu: dict[int, float] = {}
    rss: dict[int, float] = {}
    for r in view.table_ranks("process"):
        cols = _in_span(view, "process", r, span)
        g = cols["gpu_alloc_bytes"].astype(np.float64)
        g = g[g >= 0]
        if len(g):
            gpu[r] = float(g.max())
        h = cols["rss_bytes"].astype(np.float64)
        h = h[h >= 0]
        if len(h):
            rss[r] = float(h.max())
    return ("gpu", gpu) if len(gpu) >= 2 else ("host", rss)


def memory_imbalance(view: StoreView, data: StepData) -> Finding | None:
    """One rank's peak memory far above another's (uneven sharding, a rank holding extra state)."""
    resource, peaks = _peaks(view, data)
    if len(peaks) < 2:
        return None
    hi = max(peaks, key=lambda r: peaks[r])
    lo = min(peaks, key=lambda r: peaks[r])
    gap = peaks[hi] - peaks[lo]
    if peaks[hi] <= 0 or gap < th.MEM_IMBALANCE_MIN_BYTES:
        return None
    score = gap / peaks[hi]
    sev = grade(score, th.MEM_IMBALANCE_WARN, th.MEM_IMBALANCE_CRITICAL, th.MIN_STEPS_CRITICAL)
    if sev is None:
        return None
    what = "GPU peak memory" if resource == "gpu" else "host RSS peak"
    return Finding(
        kind=MEMORY_IMBALANCE,
        severity=sev,
        rank=hi,
        summary=(
            f"memory imbalance: rank {hi}'s {what} is {fmt_bytes(peaks[hi])}, rank {lo}'s {fmt_bytes(peaks[lo])} "
            f"({score * 100:.0f}% less); the largest rank sets the batch size every rank can use"
        ),
        evidence={"score": score, "max_bytes": peaks[hi], "min_bytes": peaks[lo], "min_rank": lo, "ranks": len(peaks)},
        labels={"resource": resource},
    )


def host_saturation(view: StoreView, data: StepData) -> Finding | None:
    """The node's CPU busy nearly all the time (system.cpu_pct, mean over the window)."""
    span = data.time_range()
    worst: tuple[float, int, int] | None = None
    for r in view.table_ranks("system"):
        cols = _in_span(view, "system", r, span)
        v = cols["cpu_pct"].astype(np.float64)
        v = v[np.isfinite(v) & (v >= 0)]
        if len(v) < th.HOST_MIN_SAMPLES:
            continue
        node = int(cols["node_rank"][0]) if len(cols["node_rank"]) else r
        if worst is None or float(v.mean()) > worst[0]:
            worst = (float(v.mean()), node, len(v))
    if worst is None:
        return None
    mean, node, n = worst
    if grade(mean, th.HOST_CPU_WARN, th.HOST_CPU_CRITICAL, n) is None:
        return None
    # context, not a verdict: a busy node slows every phase alike, and on a shared machine the
    # load may not be the job's own (the step rules say where the step's time went)
    return Finding(
        kind=HOST_SATURATION,
        severity="info",
        rank=None,
        summary=(
            f"host CPU saturated on node {node}: {mean:.0f}% busy on average; data loading, the Python loop "
            f"and other processes compete for cores"
        ),
        evidence={"cpu_pct": mean, "node_rank": node, "samples": n, "warn_pct": th.HOST_CPU_WARN},
        labels={"level": "critical" if mean >= th.HOST_CPU_CRITICAL else "warn"},
    )


def gpu_thermal(view: StoreView, data: StepData) -> Finding | None:
    """A GPU running hot enough to throttle (system_gpu.temp_c, 90th percentile)."""
    span = data.time_range()
    worst: tuple[float, int, int, int] | None = None
    for r in view.table_ranks("system_gpu"):
        cols = _in_span(view, "system_gpu", r, span)
        temp = cols["temp_c"].astype(np.float64)
        for g in sorted({int(x) for x in cols["gpu_idx"]}):
            sel = (cols["gpu_idx"] == g) & np.isfinite(temp) & (temp > 0)
            if int(sel.sum()) < th.GPU_UTIL_MIN_SAMPLES:
                continue
            t = float(np.percentile(temp[sel], 90))
            node = int(cols["node_rank"][sel][0])
            if worst is None or t > worst[0]:
                worst = (t, node, g, int(sel.sum()))
    if worst is None:
        return None
    t, node, g, n = worst
    sev = grade(t, th.GPU_TEMP_WARN, th.GPU_TEMP_CRITICAL, n)
    if sev is None:
        return None
    return Finding(
        kind=GPU_THERMAL,
        severity=sev,
        rank=None,
        summary=f"GPU {g} on node {node} runs at {t:.0f} °C (90th percentile): clocks throttle near this temperature",
        evidence={"temp_c": t, "node_rank": node, "gpu_idx": g, "samples": n, "warn_c": th.GPU_TEMP_WARN},
    )


def resource_findings(view: StoreView, data: StepData) -> list[Finding]:
    out = memory_pressure(view, data)
    out += [f for f in (memory_imbalance(view, data), host_saturation(view, data), gpu_thermal(view, data)) if f]
    return out
