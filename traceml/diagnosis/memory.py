"""Memory creep: a level that keeps rising through the run beyond its own noise.

Pure; the band rule and its sources (per-step peaks first, sampled levels else) are in docs/diagnosis.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.findings import MEMORY_CREEP, Finding, Severity
from traceml.diagnosis.steps import StepData
from traceml.store import StoreView
from traceml.units import fmt_bytes

SOURCES = {
    "gpu_step_peak": "GPU peak allocated memory per step",
    "gpu_alloc": "GPU allocated memory",
    "rss_step": "host RSS every few steps",
    "rss": "host RSS",
}


@dataclass(frozen=True)
class Creep:
    """The band analysis of one series (whether or not it creeps)."""

    samples: int
    baseline: float
    middle: float
    recent: float
    noise: float
    creeping: bool
    confirmed: bool

    @property
    def growth(self) -> float:
        return self.recent - self.baseline


def _band(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    n = len(values)
    a, b = int(np.floor(lo * n)), max(int(np.ceil(hi * n)), int(np.floor(lo * n)) + 1)
    return values[a:b]


def analyse_series(values: np.ndarray) -> Creep | None:
    """Band analysis of one memory series (bytes, in time order); None when too short."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & (values >= 0)]
    n = len(values)
    if n < th.CREEP_MIN_SAMPLES:
        return None
    (b0, b1), (m0, m1), (r0, r1) = th.CREEP_BANDS
    base_band = _band(values, b0, b1)
    baseline = float(np.median(base_band))
    middle = float(np.median(_band(values, m0, m1)))
    recent = float(np.median(_band(values, r0, r1)))
    sigma = 1.4826 * float(np.median(np.abs(base_band - baseline)))
    noise = max(th.CREEP_NOISE_SIGMAS * sigma, th.CREEP_MIN_BYTES, th.CREEP_MIN_FRACTION * baseline)
    growth = recent - baseline
    creeping = baseline < middle < recent and growth > noise
    confirmed = (
        creeping
        and n >= th.CREEP_CONFIRM_SAMPLES
        and (growth >= th.CREEP_CONFIRM_FRACTION * baseline or growth >= th.CREEP_CONFIRM_BYTES)
    )
    return Creep(n, baseline, middle, recent, noise, creeping, confirmed)


def _series(view: StoreView, data: StepData) -> dict[str, dict[int, np.ndarray]]:
    """source -> rank -> values in time order, restricted to the diagnosis window."""
    out: dict[str, dict[int, np.ndarray]] = {s: {} for s in SOURCES}
    for r in view.table_ranks("step_memory"):
        cols = view.columns("step_memory", r)
        steps = np.asarray(cols["step"], np.int64)
        keep = np.isin(steps, data.per_rank[r].step) if r in data.per_rank else np.zeros(len(steps), bool)
        if data.empty:
            keep[:] = True
        order = np.argsort(steps[keep], kind="stable")
        vals = np.asarray(cols["peak_alloc_bytes"], np.float64)[keep][order]
        if (vals >= 0).any():
            out["gpu_step_peak"][r] = vals
    for r in view.table_ranks("step_host"):
        cols = view.columns("step_host", r)
        steps = np.asarray(cols["step"], np.int64)
        keep = np.isin(steps, data.per_rank[r].step) if r in data.per_rank else np.zeros(len(steps), bool)
        order = np.argsort(steps[keep], kind="stable")
        vals = np.asarray(cols["rss_bytes"], np.float64)[keep][order]
        if (vals >= 0).any():
            out["rss_step"][r] = vals
    span = data.time_range()
    for r in view.table_ranks("process"):
        cols = view.columns("process", r)
        ts = np.asarray(cols["ts_ns"], np.int64)
        keep = np.ones(len(ts), bool) if span is None else (ts >= span[0]) & (ts <= span[1])
        order = np.argsort(ts[keep], kind="stable")
        rss = np.asarray(cols["rss_bytes"], np.float64)[keep][order]
        if (rss >= 0).any() and r not in out["rss_step"]:
            out["rss"][r] = rss
        if r not in out["gpu_step_peak"]:
            gpu = np.asarray(cols["gpu_alloc_bytes"], np.float64)[keep][order]
            if (gpu >= 0).any():
                out["gpu_alloc"][r] = gpu
    return out


def _capacity(view: StoreView, source: str, rank: int) -> float:
    if source in ("rss", "rss_step"):
        totals = [np.asarray(view.columns("system", r)["ram_total_bytes"]) for r in view.table_ranks("system")]
    else:
        totals = [np.asarray(view.columns("process", rank)["gpu_total_bytes"])] if view.rows("process", rank) else []
    vals = np.concatenate(totals) if totals else np.empty(0)
    vals = vals[vals > 0]
    return float(vals.max()) if len(vals) else float("nan")


def memory_creep(view: StoreView, data: StepData) -> tuple[list[Finding], list[str]]:
    """One finding per creeping source (worst rank), and the sources too short to judge."""
    findings: list[Finding] = []
    short: list[str] = []
    for source, per_rank in _series(view, data).items():
        results = {r: analyse_series(v) for r, v in per_rank.items()}
        judged = {r: c for r, c in results.items() if c is not None}
        if per_rank and not judged:
            short.append(f"{source} (fewer than {th.CREEP_MIN_SAMPLES} samples)")
        creeping = {r: c for r, c in judged.items() if c.creeping}
        if not creeping:
            continue
        worst = max(creeping, key=lambda r: creeping[r].growth)
        c = creeping[worst]
        capacity = _capacity(view, source, worst)
        near_full = np.isfinite(capacity) and c.recent >= th.CREEP_CAPACITY_CRITICAL * capacity
        severity: Severity = "critical" if (c.confirmed and near_full) else "warn" if c.confirmed else "info"
        stage = "confirmed" if c.confirmed else "early"
        growth_frac = c.growth / c.baseline if c.baseline > 0 else float("nan")
        unit = "steps" if source == "gpu_step_peak" else "samples"  # rss_step: one sample per few steps
        findings.append(
            Finding(
                kind=MEMORY_CREEP,
                severity=severity,
                rank=worst,
                summary=(
                    f"memory creep ({stage}) in {SOURCES[source]} on rank {worst}: +{fmt_bytes(c.growth)} "
                    f"(+{growth_frac * 100:.1f}%) from {fmt_bytes(c.baseline)} to {fmt_bytes(c.recent)} over "
                    f"{c.samples} {unit}, rising through the run on {len(creeping)} of {len(judged)} ranks"
                ),
                evidence={
                    "baseline_bytes": c.baseline,
                    "middle_bytes": c.middle,
                    "recent_bytes": c.recent,
                    "growth_bytes": c.growth,
                    "growth_fraction": growth_frac,
                    "noise_bytes": c.noise,
                    "capacity_bytes": capacity,
                    "samples": c.samples,
                    "ranks_creeping": len(creeping),
                    "ranks_checked": len(judged),
                },
                labels={"source": source, "stage": stage},
            )
        )
    return findings, short
