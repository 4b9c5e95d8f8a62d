"""One answer per question: the run-level figures every view, report and doc quotes.

Each figure (job step time, slowest rank and skew, share, throughput, outside-step share, run duration)
is defined once here, over the steps a :class:`~traceml.views.steps.StepData` selected; see docs/diagnosis.md.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from traceml.schema import PHASES
from traceml.store import StoreView
from traceml.views.steps import StepData, job_series, step_data

if TYPE_CHECKING:
    from traceml.views.totals import StepTotals

NAN = float("nan")


@dataclass(frozen=True)
class PartFigure:
    """A phase or region over the analysed steps."""

    name: str
    #: median over the steps of the job's value (phase: mean over ranks; a region: likewise)
    median_us: float
    #: mean per step (sum over steps and ranks / rank-steps): the figure quoted beside the share
    mean_us: float
    #: share of summed step time (0..1)
    share: float
    #: the rank with the highest median of this part, and that median
    worst_rank: int
    worst_us: float


@dataclass(frozen=True)
class JobMeasures:
    steps: int
    ranks: int
    #: step numbers every rank has (skew, slowest rank and the median step are taken over these)
    common_steps: int
    #: median / p95 of the job step time (slowest rank per step) over the common steps
    median_step_us: float
    p95_step_us: float
    #: mean step time over every rank-step (the denominator of the shares, per step)
    mean_step_us: float
    slowest_rank: int
    slowest_step_us: float
    skew_pct: float
    #: start of the first analysed step to the end of the last, of the rank with the lowest rate, seconds
    elapsed_s: float
    throughput_steps_per_s: float
    #: share (0..1) of each rank's elapsed time outside its steps, averaged over ranks
    outside_share: float
    phases: tuple[PartFigure, ...] = ()
    regions: tuple[PartFigure, ...] = ()
    #: regions timed between steps: name -> share (0..1) of the elapsed time, averaged over ranks
    between_regions: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def num(x: float, scale: float = 1.0) -> float | None:
            return None if not math.isfinite(x) else round(x * scale, 6)

        return {
            "median_step_ms": num(self.median_step_us, 1e-3),
            "p95_step_ms": num(self.p95_step_us, 1e-3),
            "mean_step_ms": num(self.mean_step_us, 1e-3),
            "common_steps": self.common_steps,
            "slowest_rank": self.slowest_rank if self.slowest_rank >= 0 else None,
            "rank_skew_pct": num(self.skew_pct),
            "elapsed_s": num(self.elapsed_s),
            "throughput_steps_per_s": num(self.throughput_steps_per_s),
            "outside_step_share": num(self.outside_share),
        }


def _nanmedian(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(np.median(v)) if len(v) else NAN


def rank_skew(data: StepData) -> tuple[float, int, float]:
    """``(skew_pct, slowest_rank, its median step us)`` on the steps every rank has; skew nan with < 2 ranks."""
    if not data.ranks:
        return NAN, -1, NAN
    common = data.common_steps()
    if len(data.ranks) == 1:
        rs = data.per_rank[data.ranks[0]]
        return NAN, data.ranks[0], _nanmedian(rs.step_us)
    if not len(common):
        return NAN, -1, NAN
    step_m = data.matrix("step", common)
    bwd = np.nan_to_num(data.matrix("backward", common))
    steps = {r: _nanmedian(step_m[i]) for i, r in enumerate(data.ranks)}
    outside = {r: _nanmedian(step_m[i] - bwd[i]) for i, r in enumerate(data.ranks)}
    return _skew_of(steps, outside)


def _skew_of(steps: Mapping[int, float], outside: Mapping[int, float]) -> tuple[float, int, float]:
    """Skew from each rank's median step time and median time outside backward (see rank_skew)."""
    steps = {r: v for r, v in steps.items() if math.isfinite(v)}
    if not steps:
        return NAN, -1, NAN
    slowest = max(steps, key=lambda r: (steps[r], -r))
    fastest = min(steps.values())
    gap = steps[slowest] - fastest
    valid = {r: v for r, v in outside.items() if math.isfinite(v) and r in steps}
    if len(valid) == len(steps):
        ne_slowest = max(valid, key=lambda r: (valid[r], -r))
        ne_gap = valid[ne_slowest] - min(valid.values())
        if ne_gap > gap:
            slowest, gap = ne_slowest, ne_gap
    skew = 100.0 * gap / fastest if len(steps) >= 2 and fastest > 0 else NAN
    return skew, slowest, steps[slowest]


def _span_ns(data: StepData, rank: int) -> tuple[int, int] | None:
    rs = data.per_rank[rank]
    if not len(rs):
        return None
    return int(rs.ts_ns[0]) - int(np.nan_to_num(rs.step_us[0])) * 1000, int(rs.ts_ns[-1])


def _part(
    name: str, per_rank: Mapping[int, np.ndarray], job: np.ndarray, step_sum: float, rank_steps: int
) -> PartFigure:
    total = float(sum(float(np.nansum(v)) for v in per_rank.values()))
    medians = {r: _nanmedian(v) for r, v in per_rank.items()}
    medians = {r: m for r, m in medians.items() if math.isfinite(m)}
    worst = max(medians, key=lambda r: (medians[r], -r)) if medians else -1
    return PartFigure(
        name=name,
        median_us=_nanmedian(job),
        mean_us=total / rank_steps if rank_steps else NAN,
        share=total / step_sum if step_sum > 0 else NAN,
        worst_rank=worst,
        worst_us=medians.get(worst, NAN),
    )


def job_measures(data: StepData, *, parts: bool = True) -> JobMeasures:
    """Every run-level figure over the analysed steps in ``data`` (see the module docstring);
    ``parts=False`` leaves out the per-phase and per-region figures (the dashboard's stats line).
    A bounded read of a long recording (``data.totals``) gives the same figures from its exact
    counts and sums and its 1% quantile sketches (:func:`totals_measures`)."""
    if data.totals is not None:
        return totals_measures(data, data.totals, parts=parts)
    n_steps = len(data.steps)
    skew, slowest, slowest_us = rank_skew(data)
    common = data.common_steps()
    job_step = np.empty(0)
    if len(common) and data.ranks:
        with np.errstate(all="ignore"):
            m = data.matrix("step", common)
            job_step = np.where(np.isfinite(m).any(axis=0), np.nanmax(np.nan_to_num(m, nan=-np.inf), axis=0), np.nan)
    job_step = job_step[np.isfinite(job_step)]
    median = p95 = NAN
    if len(job_step):
        median, p95 = (float(x) for x in np.quantile(job_step, [0.5, 0.95]))
    rank_steps = sum(len(data.per_rank[r]) for r in data.ranks)
    step_sum = float(sum(float(np.nansum(data.per_rank[r].step_us)) for r in data.ranks))
    spans: dict[int, tuple[int, int]] = {}
    for r in data.ranks:
        span = _span_ns(data, r)
        if span is not None:
            spans[r] = span
    elapsed = NAN
    outside = NAN
    throughput = NAN
    if spans:
        shares = []
        for r, (s, e) in spans.items():
            wall_us = (e - s) / 1e3
            if wall_us > 0:
                inside = float(np.nansum(data.per_rank[r].step_us))
                shares.append(min(1.0, max(0.0, 1.0 - inside / wall_us)))
                rate = len(data.per_rank[r]) / (wall_us / 1e6)
                if not math.isfinite(throughput) or rate < throughput:
                    throughput, elapsed = rate, wall_us / 1e6
        outside = float(np.mean(shares)) if shares else NAN
    phases: tuple[PartFigure, ...] = ()
    if parts:
        job = job_series(data)
        phases = tuple(
            _part(p, {r: data.per_rank[r].phases[p] for r in data.ranks}, job[p], step_sum, rank_steps) for p in PHASES
        )
    regions = []
    for name in data.region_names() if parts else ():
        per_rank = {r: data.per_rank[r].regions.get(name, np.zeros(len(data.per_rank[r]))) for r in data.ranks}
        mat = np.full((len(data.ranks), len(data.steps)), np.nan)
        for i, r in enumerate(data.ranks):
            rs = data.per_rank[r]
            pos = np.searchsorted(data.steps, rs.step)
            mat[i, pos] = per_rank[r]
        with np.errstate(all="ignore"):
            job_region = np.nanmean(mat, axis=0) if len(data.steps) else np.empty(0)
        regions.append(_part(name, per_rank, job_region, step_sum, rank_steps))
    between: dict[str, float] = {}
    if spans:
        wall_us_total = sum((e - s) / 1e3 for s, e in spans.values())
        if wall_us_total > 0:
            between = {n: v / wall_us_total for n, v in data.between_regions.items()}
    return JobMeasures(
        steps=n_steps,
        ranks=len(data.ranks),
        common_steps=len(common),
        median_step_us=median,
        p95_step_us=p95,
        mean_step_us=step_sum / rank_steps if rank_steps else NAN,
        slowest_rank=slowest,
        slowest_step_us=slowest_us,
        skew_pct=skew,
        elapsed_s=elapsed,
        throughput_steps_per_s=throughput,
        outside_share=outside,
        phases=phases,
        regions=tuple(sorted(regions, key=lambda f: (-(f.share if math.isfinite(f.share) else 0.0), f.name))),
        between_regions=between,
    )


def totals_measures(data: StepData, t: StepTotals, *, parts: bool = True) -> JobMeasures:
    """:func:`job_measures` of a run read in bounded memory: counts, sums, means, shares, elapsed
    time and throughput exact; medians and p95 from the sketches (1% relative error); skew and
    regions from the held sample of steps (``data``: every stride-th step number of every rank)."""
    ranks = t.ranks()
    # skew is a difference of medians: from the held sample's common steps (the same steps on every
    # rank, exact medians of them), not from two sketches whose 1% errors would add up in the gap
    skew, slowest, slowest_us = rank_skew(data)
    median, p95 = t.job_quantiles([0.5, 0.95])
    rank_steps = sum(t.per_rank[r].steps for r in ranks)
    step_sum = sum(t.per_rank[r].step_sum_us for r in ranks)
    elapsed, throughput, outside = t.rates(ranks)
    phases: tuple[PartFigure, ...] = ()
    regions: list[PartFigure] = []
    between: dict[str, float] = {}
    if parts:
        figs = []
        for p in PHASES:
            total = sum(t.per_rank[r].phase_sum_us[p] for r in ranks)
            medians = {r: t.per_rank[r].phases[p].quantile(0.5) for r in ranks}
            medians = {r: m for r, m in medians.items() if math.isfinite(m)}
            worst = max(medians, key=lambda r: (medians[r], -r)) if medians else -1
            figs.append(
                PartFigure(
                    name=p,
                    median_us=t.job_phases[p].quantile(0.5),
                    mean_us=total / rank_steps if rank_steps else NAN,
                    share=total / step_sum if step_sum > 0 else NAN,
                    worst_rank=worst,
                    worst_us=medians.get(worst, NAN),
                )
            )
        phases = tuple(figs)
        sample = job_measures(replace(data, totals=None), parts=True) if data.region_names() else None
        if sample is not None:
            regions = list(sample.regions)
            between = dict(sample.between_regions)
    return JobMeasures(
        steps=t.steps,
        ranks=len(ranks),
        common_steps=t.common_steps,
        median_step_us=median,
        p95_step_us=p95,
        mean_step_us=step_sum / rank_steps if rank_steps else NAN,
        slowest_rank=slowest,
        slowest_step_us=slowest_us,
        skew_pct=skew,
        elapsed_s=elapsed,
        throughput_steps_per_s=throughput,
        outside_share=outside,
        phases=phases,
        regions=tuple(regions),
        between_regions=between,
    )


def run_duration_s(view: StoreView) -> float:
    """The run's duration: the aggregator's measured one once the run ended, else start to newest row."""
    exit_info = view.attachments.get("exit")
    if isinstance(exit_info, Mapping):
        d = exit_info.get("duration_s")
        if isinstance(d, (int, float)) and not isinstance(d, bool) and d > 0 and math.isfinite(d):
            return float(d)
    start = run_start_ns(view)
    if start is not None and view.latest_ns > start:
        return (view.latest_ns - start) / 1e9
    return NAN


def run_start_ns(view: StoreView) -> int | None:
    """The run's start: the metadata's ``start_ns`` (or a recording's ``created_ns``), else its first row."""
    meta: dict[str, Any] = {}
    nested = view.meta.get("meta")
    if isinstance(nested, Mapping):
        meta.update(nested)
    meta.update({k: v for k, v in view.meta.items() if k != "meta"})
    for key in ("start_ns", "created_ns"):
        v = meta.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    firsts = [int(np.min(c["ts_ns"])) for c in view.tables.values() if "ts_ns" in c and len(c["ts_ns"])]
    firsts = [t for t in firsts if t > 0]
    return min(firsts) if firsts else None


#: the last few views' figures, so the dashboard's charts of one snapshot compute them once
_MEMO: list[tuple[Any, Any, JobMeasures]] = []
_MEMO_SIZE = 8


def view_measures(
    view: StoreView, step_range: tuple[int, int] | None = None, ranks: tuple[int, ...] | None = None
) -> JobMeasures:
    """:func:`job_measures` (without parts) over ``view``'s steps in ``step_range`` of ``ranks``
    (the whole run after the warm-up when no range), remembered for the last few views."""
    key = (step_range, ranks)
    for ref, k, m in _MEMO:
        if ref() is view and k == key:
            return m
    m = job_measures(step_data(view, step_range=step_range, ranks=ranks), parts=False)
    _MEMO.insert(0, (weakref.ref(view), key, m))
    del _MEMO[_MEMO_SIZE:]
    return m
