"""Step views: StoreView -> per-step and per-rank step-time models for charts.

Written once against a :class:`~traceml.views.stepsource.StepSource`; steps bucketed by value, so ranks line up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from traceml.schema import PHASES
from traceml.store import StoreView
from traceml.views.downsample import MAX_POINTS, Trace
from traceml.views.select import StepRange, TimeRange, ms, origin_ns
from traceml.views.stepsource import StepGrid
from traceml.views.stepsources import step_source

#: default cap on heatmap columns (step buckets)
HEATMAP_BUCKETS = 400

_EMPTY_F = np.empty(0, dtype=np.float64)


@dataclass(frozen=True)
class StepBreakdown:
    """Mean time per phase (ms) per step bucket, over the selected ranks."""

    steps: np.ndarray
    phases: Mapping[str, np.ndarray]
    total_ms: np.ndarray
    #: median and p95 step of the job (the slowest rank's time per step, on the steps every selected
    #: rank has; the warm-up left out over the whole run): the figures of summary.json and the live view
    median_ms: float
    p95_ms: float
    bucket_steps: int
    ranks: tuple[int, ...]
    rows: int
    step_range: StepRange | None
    #: False when drawn from the rollup (a long recording still loading): means are exact,
    #: median and p95 are not known yet (nan)
    exact: bool = True
    #: named regions (``trace_time``): mean ms per bucket of the part outside the standard phases,
    #: which ``phases["residual"]`` no longer holds
    regions: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: measured steps/s and the share (0..1) of wall time outside any step (traceml.views.measures)
    steps_per_s: float = math.nan
    outside_share: float = math.nan

    @property
    def empty(self) -> bool:
        return self.rows == 0


@dataclass(frozen=True)
class RankStat:
    rank: int
    steps: int
    median_ms: float
    p95_ms: float
    mean_ms: float


@dataclass(frozen=True)
class RankSteps:
    """Per-rank step time: lines, per-rank stats, skew, slowest rank and a ranks x steps heatmap."""

    traces: tuple[Trace, ...]
    stats: tuple[RankStat, ...]
    slowest_rank: int | None
    #: 100 * (slowest - fastest) / fastest over the ranks' median step times (as the live view); nan with < 2 ranks
    skew_pct: float
    heat_steps: np.ndarray
    heat_ranks: tuple[int, ...]
    heat_ms: np.ndarray  # (len(heat_ranks), len(heat_steps)), nan where a rank has no step
    bucket_steps: int
    step_range: StepRange | None
    #: False when drawn from the rollup: lines are min/max envelopes per group of steps, the
    #: ranks' medians unknown (nan), and the slowest rank and skew use their means
    exact: bool = True

    @property
    def empty(self) -> bool:
        return not self.stats


def _bucket_means(
    grid: StepGrid, counts: np.ndarray, total: np.ndarray, sums: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """``(x, phase ms, total ms)`` of the non-empty step buckets from their counts and us sums."""
    present = counts > 0
    denom = counts[present] * 1000.0
    phase_ms = {p: np.maximum(v[present] / denom, 0.0) for p, v in sums.items()}
    return grid.centres[present], phase_ms, np.maximum(total[present] / denom, 0.0)


def _mean_ms(counts: np.ndarray, sums_us: np.ndarray) -> np.ndarray:
    """Mean ms per bucket, nan where a bucket is empty (a heatmap row)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.maximum(sums_us, 0) / np.where(counts > 0, counts, 1) / 1000.0, np.nan)


def step_range_of(view: StoreView, ranks: Iterable[int] | None = None) -> StepRange | None:
    """The smallest and largest step held for the selected ranks."""
    return step_source(view, ranks).span()


def step_breakdown(
    view: StoreView,
    ranks: Iterable[int] | None = None,
    step_range: StepRange | None = None,
    phases: Sequence[str] = PHASES,
    max_buckets: int = MAX_POINTS,
) -> StepBreakdown:
    """Mean phase times per step bucket over the selected ranks, with the range's median and p95."""
    src = step_source(view, ranks, step_range)
    held = src.per_rank()
    if not held:
        empty = {p: _EMPTY_F for p in phases}
        return StepBreakdown(
            _EMPTY_F, empty, _EMPTY_F, math.nan, math.nan, 1, src.chosen, 0, step_range, exact=src.exact
        )
    grid = src.grid(max_buckets)
    counts = np.zeros(grid.n)
    total = np.zeros(grid.n)
    sums = {p: np.zeros(grid.n) for p in phases}
    columns = ("step_us", *(f"{p}_us" for p in phases))
    for r in held:
        c, s = src.bucket_sums(r, grid, columns)
        counts += c
        total += s["step_us"]
        for p in phases:
            if f"{p}_us" in s:
                sums[p] += s[f"{p}_us"]
    region_sums = src.region_sums(grid) if "residual" in sums else {}
    for v in region_sums.values():
        sums["residual"] -= v
    x, phase_ms, total_ms = _bucket_means(grid, counts, total, sums)
    regions = _bucket_means(grid, counts, total, region_sums)[1] if region_sums else {}
    fig = src.figures()
    return StepBreakdown(
        x,
        phase_ms,
        total_ms,
        fig.median_ms,
        fig.p95_ms,
        grid.width,
        held,
        int(counts.sum()),
        step_range,
        exact=src.exact,
        regions=regions,
        steps_per_s=fig.steps_per_s,
        outside_share=fig.outside_share,
    )


def rank_steps(
    view: StoreView,
    ranks: Iterable[int] | None = None,
    step_range: StepRange | None = None,
    max_points: int = MAX_POINTS,
    heat_buckets: int = HEATMAP_BUCKETS,
) -> RankSteps:
    """Per-rank step time lines (reduced), per-rank median/p95, skew and the ranks x steps heatmap."""
    src = step_source(view, ranks, step_range)
    held = src.per_rank()
    if not held:
        return RankSteps((), (), None, math.nan, _EMPTY_F, (), np.empty((0, 0)), 1, step_range, exact=src.exact)
    grid = src.grid(heat_buckets)
    traces, stats = [], []
    heat = np.full((len(held), grid.n), np.nan)
    for i, r in enumerate(held):
        x, y, points = src.line(r, max_points)
        traces.append(Trace(f"rank {r}", x, ms(y), rank=r, points=points))
        med, p95 = src.quantiles(r, (0.5, 0.95))
        stats.append(RankStat(r, src.count(r), med / 1000.0, p95 / 1000.0, src.mean_ms(r)))
        c, s = src.bucket_sums(r, grid, ("step_us",))
        heat[i] = _mean_ms(c, s["step_us"])
    fig = src.figures()
    return RankSteps(
        tuple(traces),
        tuple(stats),
        fig.slowest_rank,
        fig.skew_pct,
        grid.centres,
        held,
        heat,
        grid.width,
        step_range,
        exact=src.exact,
    )


def step_range_to_time(
    view: StoreView, step_range: StepRange | None, ranks: Iterable[int] | None = None
) -> TimeRange | None:
    """The time window (s since origin) the selected ranks spent in ``step_range``."""
    if step_range is None:
        return None
    t0 = origin_ns(view)
    span = step_source(view, ranks, step_range).time_span()
    if span is None:
        return None
    return ((span[0] - t0) / 1e9, (span[1] - t0) / 1e9)
