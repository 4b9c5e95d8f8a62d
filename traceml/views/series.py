"""Series views: StoreView -> per-step / per-rank / per-time series for charts.

Pure functions (no clock, no I/O) shared by the live and the replay dashboard.  Long
series are reduced here, on the server, with vectorised numpy: min/max per bucket
(keeps spikes); the browser never gets more than ``max_points`` points per trace.
Steps are bucketed by *value*, so ranks with gaps or different step counts still line up.  Times are seconds since the run's origin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traceml.schema import PHASES, ROLLUP_ROWS, ROLLUP_STEP_LAST, rollup_name
from traceml.store import StoreView
from traceml.views import steps as _steps
from traceml.views.measures import run_duration_s, view_measures
from traceml.views.steps import MAX_REGIONS, OTHER_REGIONS, with_regions

#: default cap on the points of one drawn trace (min/max gives 2 per bucket)
MAX_POINTS = 2000
#: default cap on heatmap columns (step buckets)
HEATMAP_BUCKETS = 400

StepRange = tuple[int, int]
TimeRange = tuple[float, float]

_EMPTY_F = np.empty(0, dtype=np.float64)
#: the per-step table's rollup (traceml.format.rollup): what a long recording draws from while it loads
ROLLUP_STEP_TIME = rollup_name("step_time")


# --- downsampling --------------------------------------------------------------------------


def downsample_minmax(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Keep each bucket's minimum and maximum (in their original order) and both ends: <= ``max_points`` points.

    Buckets are equal runs of consecutive points; ``x`` is assumed sorted.  NaNs are
    ignored unless a whole bucket is NaN (then the bucket keeps a NaN, i.e. a gap).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    n = len(y)
    if n <= max_points:
        return x, y
    max_points = max(max_points, 6)
    n_buckets = (max_points - 2) // 2  # two points per bucket, plus the first and the last point
    width = math.ceil(n / n_buckets)
    full = n // width
    yf = y.astype(np.float64, copy=False)
    body = yf[: full * width].reshape(full, width)
    if np.isnan(body).any():
        lo_src = np.where(np.isnan(body), np.inf, body)
        hi_src = np.where(np.isnan(body), -np.inf, body)
    else:
        lo_src = hi_src = body
    base = np.arange(full, dtype=np.int64) * width
    i_lo = base + lo_src.argmin(axis=1)
    i_hi = base + hi_src.argmax(axis=1)
    pairs = [np.minimum(i_lo, i_hi), np.maximum(i_lo, i_hi)]
    if full * width < n:
        tail = yf[full * width :]
        start = full * width
        finite = ~np.isnan(tail)
        if finite.any():
            t_lo = start + int(np.argmin(np.where(finite, tail, np.inf)))
            t_hi = start + int(np.argmax(np.where(finite, tail, -np.inf)))
        else:
            t_lo = t_hi = start
        pairs[0] = np.append(pairs[0], min(t_lo, t_hi))
        pairs[1] = np.append(pairs[1], max(t_lo, t_hi))
    idx = np.concatenate([[0], np.column_stack(pairs).ravel(), [n - 1]])  # keep the ends: the x range stays true
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]  # a bucket whose min and max are the same point
    idx = idx[keep]
    return x[idx], y[idx]


# --- view models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """One drawn line: ``x`` / ``y`` already reduced; ``points`` = rows it stands for."""

    name: str
    x: np.ndarray
    y: np.ndarray
    rank: int | None = None
    points: int = 0
    group: str = ""

    @property
    def downsampled(self) -> bool:
        return self.points > len(self.y)


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


@dataclass(frozen=True)
class Throughput:
    """Steps per second over time (s since origin), averaged over the selected ranks running then."""

    x_s: np.ndarray
    steps_per_s: np.ndarray
    mean_steps_per_s: float
    steps: int

    @property
    def empty(self) -> bool:
        return self.steps == 0


@dataclass(frozen=True)
class MemorySeries:
    """Per-rank memory over time (s since origin), in GiB; empty tuples when not recorded."""

    rss: tuple[Trace, ...]
    gpu_alloc: tuple[Trace, ...]
    gpu_peak: tuple[Trace, ...]
    gpu_total_gib: float


@dataclass(frozen=True)
class SystemSeries:
    """Per-node host and per-GPU device samples over time (s since origin)."""

    cpu_pct: tuple[Trace, ...]
    ram_used_gib: tuple[Trace, ...]
    ram_total_gib: float
    gpu_util_pct: tuple[Trace, ...]
    gpu_mem_gib: tuple[Trace, ...]
    gpu_temp_c: tuple[Trace, ...]
    gpu_power_w: tuple[Trace, ...]

    @property
    def host_recorded(self) -> bool:
        return bool(self.cpu_pct or self.ram_used_gib)

    @property
    def gpu_recorded(self) -> bool:
        return bool(self.gpu_util_pct or self.gpu_mem_gib or self.gpu_temp_c or self.gpu_power_w)


@dataclass(frozen=True)
class RunInfo:
    """Run metadata, environment, rank states and integrity, as display strings."""

    title: str
    meta: tuple[tuple[str, str], ...]
    ranks: tuple[tuple[str, ...], ...]  # rows: rank, host, state, exit, steps, dropped
    environment: tuple[tuple[str, str], ...]
    integrity: tuple[tuple[str, str], ...]
    integrity_status: str  # "live" | "complete" | "recovered" | "damaged"
    origin_ns: int
    extra: Mapping[str, Any] = field(default_factory=dict)


# --- helpers --------------------------------------------------------------------------------


def selected_ranks(view: StoreView, table: str, ranks: Iterable[int] | None) -> list[int]:
    present = view.table_ranks(table)
    if ranks is None:
        return present
    wanted = set(ranks)
    return [r for r in present if r in wanted]


def origin_ns(view: StoreView) -> int:
    """The run's time zero: ``meta['start_ns']`` when set, else the earliest timestamp held."""
    start = view.meta.get("start_ns")
    if isinstance(start, int) and start > 0:
        return start
    first = [int(c["ts_ns"][0]) for c in view.tables.values() if "ts_ns" in c and len(c["ts_ns"])]
    return min(first) if first else 0


def _sorted_by(cols: Mapping[str, np.ndarray], key: str) -> Mapping[str, np.ndarray]:
    k = cols[key]
    if len(k) < 2 or bool(np.all(k[1:] >= k[:-1])):
        return cols
    order = np.argsort(k, kind="stable")
    return {c: np.asarray(v)[order] for c, v in cols.items()}


def _range_slice(keys: np.ndarray, lo: float | None, hi: float | None) -> slice:
    a = 0 if lo is None else int(np.searchsorted(keys, lo, side="left"))
    b = len(keys) if hi is None else int(np.searchsorted(keys, hi, side="right"))
    return slice(a, b)


def _step_cols(view: StoreView, rank: int, step_range: StepRange | None) -> Mapping[str, np.ndarray]:
    cols = view.columns("step_time", rank)
    if "step" not in cols or not len(cols["step"]):
        return {}
    cols = _sorted_by(cols, "step")
    if step_range is None:
        return cols
    sl = _range_slice(cols["step"], step_range[0], step_range[1])
    return {c: v[sl] for c, v in cols.items()}


def _ms(values: np.ndarray) -> np.ndarray:
    """``*_us`` int64 (``-1`` = not measured) -> float ms with NaN for missing."""
    out = values.astype(np.float64) / 1000.0
    if len(values) and values.min() < 0:
        out[values < 0] = np.nan
    return out


def _bucket_width(lo: int, hi: int, max_buckets: int) -> int:
    return max(1, math.ceil((hi - lo + 1) / max(1, max_buckets)))


class _Buckets:
    """Equal-width step buckets over sorted ``steps``: bucket starts found by binary search (no full pass)."""

    __slots__ = ("starts", "index", "counts")

    def __init__(self, steps: np.ndarray, lo: int, width: int, n: int) -> None:
        edges = lo + np.arange(n, dtype=np.int64) * width
        starts = np.searchsorted(steps, edges, side="left")
        counts = np.diff(np.append(starts, len(steps)))
        nonempty = counts > 0
        self.starts = starts[nonempty]
        self.index = np.flatnonzero(nonempty)
        self.counts = np.zeros(n, dtype=np.int64)
        self.counts[self.index] = counts[nonempty]

    def sums(self, values: np.ndarray, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.float64)
        if len(self.starts):
            out[self.index] = np.add.reduceat(values, self.starts)
        return out


#: widest value range (max - min) for which quantiles are counted instead of partitioned
_COUNTING_RANGE = 1 << 22


def quantiles_us(chunks: Sequence[np.ndarray], qs: Sequence[float]) -> list[float]:
    """Exact quantiles (numpy's "linear" method) of non-negative integer durations over several arrays.

    Counting (``bincount``) is several times faster than ``np.percentile``'s partition on
    millions of rows; it is used when the value range is small, which durations in us are.
    Negative values ("not measured") are ignored.  Returns nan for each q when nothing is left.
    """
    parts = [c[c >= 0] if len(c) and c.min() < 0 else c for c in chunks]
    parts = [c for c in parts if len(c)]
    if not parts:
        return [math.nan for _ in qs]
    lo = min(int(c.min()) for c in parts)
    hi = max(int(c.max()) for c in parts)
    total = sum(len(c) for c in parts)
    if any(c.dtype.kind not in "iu" for c in parts) or hi - lo > _COUNTING_RANGE:
        allv = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return [float(v) for v in np.percentile(allv, [q * 100 for q in qs])]
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    for c in parts:
        counts += np.bincount(c - lo if lo else c, minlength=hi - lo + 1)
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        pos = q * (total - 1)
        k0 = math.floor(pos)
        k1 = min(k0 + 1, total - 1)
        v0 = lo + int(np.searchsorted(cum, k0, side="right"))
        v1 = lo + int(np.searchsorted(cum, k1, side="right"))
        out.append(v0 + (v1 - v0) * (pos - k0))
    return out


def _valid_steps(cols: Mapping[str, np.ndarray]) -> np.ndarray:
    """``step_us`` of the steps that did not fail (failed steps are partial)."""
    failed = cols.get("failed")
    if failed is not None and len(failed) and failed.any():
        return cols["step_us"][failed == 0]
    return cols["step_us"]


def _quantiles(chunks: list[np.ndarray]) -> tuple[float, float]:
    med, p95 = quantiles_us(chunks, (0.5, 0.95))
    return med / 1000.0, p95 / 1000.0


def _bucket_means(
    lo: int, width: int, n: int, counts: np.ndarray, total: np.ndarray, sums: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """``(x, phase ms, total ms)`` of the non-empty step buckets from their counts and us sums."""
    present = counts > 0
    denom = counts[present] * 1000.0
    phase_ms = {p: np.maximum(v[present] / denom, 0.0) for p, v in sums.items()}
    x = (lo + np.arange(n, dtype=np.float64) * width + (width - 1) / 2.0)[present]
    return x, phase_ms, np.maximum(total[present] / denom, 0.0)


def _mean_ms(counts: np.ndarray, sums_us: np.ndarray) -> np.ndarray:
    """Mean ms per bucket, nan where a bucket is empty (a heatmap row)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.maximum(sums_us, 0) / np.where(counts > 0, counts, 1) / 1000.0, np.nan)


# --- the rollup of step_time (a long recording's first charts) ---------------------------------
# One rollup row summarises a group of consecutive steps of one rank (``step`` .. ``step_last``,
# ``rows`` steps, ``<column>.sum|min|max``).  Means per bucket stay exact; quantiles are not known.


def _from_rollup(view: StoreView) -> bool:
    """Draw from the rollup: the view holds it and not the raw rows (a replay still loading)."""
    return not view.has("step_time") and view.has(ROLLUP_STEP_TIME)


def _rollup_cols(view: StoreView, rank: int, step_range: StepRange | None) -> Mapping[str, np.ndarray]:
    """The rank's rollup rows sorted by first step; with a range, the groups that overlap it."""
    cols = view.columns(ROLLUP_STEP_TIME, rank)
    if "step" not in cols or not len(cols["step"]):
        return {}
    cols = _sorted_by(cols, "step")
    if step_range is not None:
        keep = (cols[ROLLUP_STEP_LAST] >= step_range[0]) & (cols["step"] <= step_range[1])
        cols = {c: v[keep] for c, v in cols.items()}
        if not len(cols["step"]):
            return {}
    return cols


def _rollup_per_rank(
    view: StoreView, ranks: Iterable[int] | None, step_range: StepRange | None
) -> dict[int, Mapping[str, np.ndarray]]:
    chosen = selected_ranks(view, ROLLUP_STEP_TIME, ranks)
    per_rank = {r: _rollup_cols(view, r, step_range) for r in chosen}
    return {r: c for r, c in per_rank.items() if c}


def _rollup_step_range(view: StoreView, ranks: Iterable[int] | None) -> StepRange | None:
    per_rank = _rollup_per_rank(view, ranks, None)
    if not per_rank:
        return None
    return (
        min(int(c["step"].min()) for c in per_rank.values()),
        max(int(c[ROLLUP_STEP_LAST].max()) for c in per_rank.values()),
    )


def _rollup_buckets(
    per_rank: Mapping[int, Mapping[str, np.ndarray]], max_buckets: int
) -> tuple[int, int, int, dict[int, np.ndarray]]:
    """``(lo, width, n, {rank: bucket of each group})``: equal step buckets, a whole number of groups wide."""
    group = max(int((c[ROLLUP_STEP_LAST] - c["step"]).max()) + 1 for c in per_rank.values())
    first = min(int(c["step"][0]) for c in per_rank.values())
    hi = max(int(c[ROLLUP_STEP_LAST].max()) for c in per_rank.values())
    lo = first - first % group
    width = _bucket_width(lo, hi, max_buckets)
    width = max(group, -(-width // group) * group)
    n = (hi - lo) // width + 1
    return lo, width, n, {r: (c["step"] - lo) // width for r, c in per_rank.items()}


def _rollup_breakdown(
    view: StoreView,
    ranks: Iterable[int] | None,
    step_range: StepRange | None,
    phases: Sequence[str],
    max_buckets: int,
) -> StepBreakdown:
    per_rank = _rollup_per_rank(view, ranks, step_range)
    chosen = tuple(selected_ranks(view, ROLLUP_STEP_TIME, ranks))
    if not per_rank:
        empty = {p: _EMPTY_F for p in phases}
        return StepBreakdown(_EMPTY_F, empty, _EMPTY_F, math.nan, math.nan, 1, chosen, 0, step_range, exact=False)
    lo, width, n, index = _rollup_buckets(per_rank, max_buckets)
    counts = np.zeros(n)
    total = np.zeros(n)
    sums = {p: np.zeros(n) for p in phases}
    for r, cols in per_rank.items():
        idx = index[r]
        counts += np.bincount(idx, weights=cols[ROLLUP_ROWS], minlength=n)
        total += np.bincount(idx, weights=cols["step_us.sum"], minlength=n)
        for p in phases:
            col = cols.get(f"{p}_us.sum")
            if col is not None:
                sums[p] += np.bincount(idx, weights=col, minlength=n)
    x, phase_ms, total_ms = _bucket_means(lo, width, n, counts, total, sums)
    rows = int(counts.sum())
    return StepBreakdown(
        x, phase_ms, total_ms, math.nan, math.nan, width, tuple(per_rank), rows, step_range, exact=False
    )


def _envelope(cols: Mapping[str, np.ndarray], max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max ``step_us`` per group (merged k groups at a time to fit ``max_points``): the
    line goes through each group's minimum at its first step and its maximum at its last."""
    k = max(1, math.ceil(2 * len(cols["step"]) / max(2, max_points)))
    starts = np.arange(0, len(cols["step"]), k)
    lows = np.minimum.reduceat(cols["step_us.min"], starts)
    highs = np.maximum.reduceat(cols["step_us.max"], starts)
    first = cols["step"][starts]
    last = np.maximum.reduceat(cols[ROLLUP_STEP_LAST], starts)
    x = np.empty(2 * len(starts), dtype=np.float64)
    y = np.empty(2 * len(starts), dtype=np.int64)
    x[0::2], x[1::2] = first, last
    y[0::2], y[1::2] = lows, highs
    return x, y


def _rollup_rank_steps(
    view: StoreView,
    ranks: Iterable[int] | None,
    step_range: StepRange | None,
    max_points: int,
    heat_buckets: int,
) -> RankSteps:
    per_rank = _rollup_per_rank(view, ranks, step_range)
    if not per_rank:
        return RankSteps((), (), None, math.nan, _EMPTY_F, (), np.empty((0, 0)), 1, step_range, exact=False)
    lo, width, n, index = _rollup_buckets(per_rank, heat_buckets)
    traces, stats = [], []
    heat = np.full((len(per_rank), n), np.nan)
    for i, (r, cols) in enumerate(per_rank.items()):
        x, y = _envelope(cols, max_points)
        steps = int(cols[ROLLUP_ROWS].sum())
        traces.append(Trace(f"rank {r}", x, _ms(y), rank=r, points=steps))
        mean = float(cols["step_us.sum"].sum()) / max(steps, 1) / 1000.0
        stats.append(RankStat(r, steps, math.nan, math.nan, max(mean, 0.0)))
        c = np.bincount(index[r], weights=cols[ROLLUP_ROWS], minlength=n)
        heat[i] = _mean_ms(c, np.bincount(index[r], weights=cols["step_us.sum"], minlength=n))
    means = np.array([s.mean_ms for s in stats])
    slowest = int(stats[int(np.argmax(means))].rank)
    skew = math.nan
    if len(means) >= 2 and means.min() > 0:
        skew = float((means.max() - means.min()) / means.min() * 100.0)
    heat_x = lo + np.arange(n, dtype=np.float64) * width + (width - 1) / 2.0
    return RankSteps(
        tuple(traces), tuple(stats), slowest, skew, heat_x, tuple(per_rank), heat, width, step_range, exact=False
    )


def _rollup_step_range_to_time(
    view: StoreView, step_range: StepRange, ranks: Iterable[int] | None, t0: int
) -> TimeRange | None:
    per_rank = _rollup_per_rank(view, ranks, step_range)
    if not per_rank:
        return None
    lo_ns = min(int(c["ts_ns.min"].min()) for c in per_rank.values())
    hi_ns = max(int(c["ts_ns.max"].max()) for c in per_rank.values())
    return ((lo_ns - t0) / 1e9, (hi_ns - t0) / 1e9)


# --- step views -----------------------------------------------------------------------------


def step_range_of(view: StoreView, ranks: Iterable[int] | None = None) -> StepRange | None:
    """The smallest and largest step held for the selected ranks."""
    if _from_rollup(view):
        return _rollup_step_range(view, ranks)
    lo, hi = None, None
    for r in selected_ranks(view, "step_time", ranks):
        s = view.columns("step_time", r).get("step")
        if s is None or not len(s):
            continue
        a, b = int(s.min()), int(s.max())
        lo = a if lo is None else min(lo, a)
        hi = b if hi is None else max(hi, b)
    return None if lo is None or hi is None else (lo, hi)


def _region_sums(
    view: StoreView, per_rank: Mapping[int, Mapping[str, np.ndarray]], lo: int, width: int, n: int
) -> dict[str, np.ndarray]:
    """Per step bucket, the us of each named region outside the standard phases (summed over ranks)."""
    sums: dict[str, np.ndarray] = {}
    for rank, cols in per_rank.items():
        if not view.rows("step_region", rank):
            continue
        step_us = np.asarray(cols["step_us"], np.float64)
        phase_us = {}
        for p in PHASES:
            v = np.asarray(cols.get(f"{p}_us", np.full(len(step_us), -1)), np.float64)
            phase_us[p] = np.where(v >= 0, v, np.nan)
        rs = _steps.RankSteps(
            rank=rank,
            step=np.asarray(cols["step"], np.int64),
            ts_ns=np.asarray(cols["ts_ns"], np.int64),
            step_us=np.where(step_us >= 0, step_us, np.nan),
            phases=phase_us,
        )
        timeline = view.columns("step_timeline", rank) if view.rows("step_timeline", rank) else None
        own = with_regions(rs, view.columns("step_region", rank), timeline).regions_own
        if not own:
            continue
        buckets = _Buckets(rs.step, lo, width, n)
        for name, values in own.items():
            sums[name] = sums.get(name, np.zeros(n)) + buckets.sums(values, n)
    if len(sums) > MAX_REGIONS:
        order = sorted(sums, key=lambda k: (-float(sums[k].sum()), k))
        rest = sum((sums[k] for k in order[MAX_REGIONS - 1 :]), np.zeros(n))
        sums = {k: sums[k] for k in order[: MAX_REGIONS - 1]}
        sums[OTHER_REGIONS] = sums.get(OTHER_REGIONS, np.zeros(n)) + rest
    return sums


def step_breakdown(
    view: StoreView,
    ranks: Iterable[int] | None = None,
    step_range: StepRange | None = None,
    phases: Sequence[str] = PHASES,
    max_buckets: int = MAX_POINTS,
) -> StepBreakdown:
    """Mean phase times per step bucket over the selected ranks, with the range's median and p95."""
    if _from_rollup(view):
        return _rollup_breakdown(view, ranks, step_range, phases, max_buckets)
    chosen = selected_ranks(view, "step_time", ranks)
    per_rank = {r: _step_cols(view, r, step_range) for r in chosen}
    per_rank = {r: c for r, c in per_rank.items() if c and len(c["step"])}
    if not per_rank:
        return StepBreakdown(
            _EMPTY_F, {p: _EMPTY_F for p in phases}, _EMPTY_F, math.nan, math.nan, 1, tuple(chosen), 0, step_range
        )
    lo = min(int(c["step"][0]) for c in per_rank.values())
    hi = max(int(c["step"][-1]) for c in per_rank.values())
    width = _bucket_width(lo, hi, max_buckets)
    n = (hi - lo) // width + 1
    counts = np.zeros(n, dtype=np.int64)
    sums = {p: np.zeros(n) for p in phases}
    total = np.zeros(n)
    rows = 0
    for cols in per_rank.values():
        steps = cols["step"]
        rows += len(steps)
        buckets = _Buckets(steps, lo, width, n)
        # int64 sums: a "not measured" -1 costs at most 1 us per row, and means are clipped at 0
        total += buckets.sums(cols["step_us"], n)
        counts += buckets.counts
        for p in phases:
            col = cols.get(f"{p}_us")
            if col is not None:
                sums[p] += buckets.sums(col, n)
    region_sums = _region_sums(view, per_rank, lo, width, n) if "residual" in sums else {}
    for v in region_sums.values():
        sums["residual"] -= v
    x, phase_ms, total_ms = _bucket_means(lo, width, n, counts, total, sums)
    regions = _bucket_means(lo, width, n, counts, total, region_sums)[1] if region_sums else {}
    m = view_measures(view, step_range, tuple(chosen))
    med, p95 = m.median_step_us / 1000.0, m.p95_step_us / 1000.0
    return StepBreakdown(
        x,
        phase_ms,
        total_ms,
        med,
        p95,
        width,
        tuple(per_rank),
        rows,
        step_range,
        regions=regions,
        steps_per_s=m.throughput_steps_per_s,
        outside_share=m.outside_share,
    )


def rank_steps(
    view: StoreView,
    ranks: Iterable[int] | None = None,
    step_range: StepRange | None = None,
    max_points: int = MAX_POINTS,
    heat_buckets: int = HEATMAP_BUCKETS,
) -> RankSteps:
    """Per-rank step time lines (reduced), per-rank median/p95, skew and the ranks x steps heatmap."""
    if _from_rollup(view):
        return _rollup_rank_steps(view, ranks, step_range, max_points, heat_buckets)
    chosen = selected_ranks(view, "step_time", ranks)
    per_rank = {r: _step_cols(view, r, step_range) for r in chosen}
    per_rank = {r: c for r, c in per_rank.items() if c and len(c["step"])}
    if not per_rank:
        return RankSteps((), (), None, math.nan, _EMPTY_F, (), np.empty((0, 0)), 1, step_range)
    traces = []
    stats = []
    lo = min(int(c["step"][0]) for c in per_rank.values())
    hi = max(int(c["step"][-1]) for c in per_rank.values())
    width = _bucket_width(lo, hi, heat_buckets)
    n = (hi - lo) // width + 1
    heat = np.full((len(per_rank), n), np.nan)
    for i, (r, cols) in enumerate(per_rank.items()):
        steps, step_us = cols["step"], cols["step_us"]
        x, y = downsample_minmax(steps, step_us, max_points)
        traces.append(Trace(f"rank {r}", x, _ms(y), rank=r, points=len(steps)))
        valid = _valid_steps(cols)
        valid = valid[valid >= 0] if len(valid) and valid.min() < 0 else valid
        med, p95 = _quantiles([valid])
        mean = float(valid.mean()) / 1000.0 if len(valid) else math.nan
        stats.append(RankStat(r, len(steps), med, p95, mean))
        buckets = _Buckets(steps, lo, width, n)
        heat[i] = _mean_ms(buckets.counts, buckets.sums(step_us, n))
    # the one definition every view shares (traceml.views.measures): on the steps every rank has,
    # after the warm-up for the whole run, over the chosen steps when zoomed
    m = view_measures(view, step_range, tuple(chosen))
    slowest = m.slowest_rank if m.slowest_rank >= 0 else None
    skew = m.skew_pct
    heat_x = lo + np.arange(n, dtype=np.float64) * width + (width - 1) / 2.0
    return RankSteps(tuple(traces), tuple(stats), slowest, skew, heat_x, tuple(per_rank), heat, width, step_range)


def step_range_to_time(
    view: StoreView, step_range: StepRange | None, ranks: Iterable[int] | None = None
) -> TimeRange | None:
    """The time window (s since origin) the selected ranks spent in ``step_range``."""
    if step_range is None:
        return None
    t0 = origin_ns(view)
    if _from_rollup(view):
        return _rollup_step_range_to_time(view, step_range, ranks, t0)
    lo_ns: int | None = None
    hi_ns: int | None = None
    for r in selected_ranks(view, "step_time", ranks):
        cols = _step_cols(view, r, step_range)
        if not cols or not len(cols["step"]):
            continue
        start = int(cols["ts_ns"][0]) - max(int(cols["step_us"][0]), 0) * 1000
        end = int(cols["ts_ns"][-1])
        lo_ns = start if lo_ns is None else min(lo_ns, start)
        hi_ns = end if hi_ns is None else max(hi_ns, end)
    if lo_ns is None or hi_ns is None:
        return None
    return ((lo_ns - t0) / 1e9, (hi_ns - t0) / 1e9)


def throughput(
    view: StoreView,
    ranks: Iterable[int] | None = None,
    step_range: StepRange | None = None,
    max_points: int = MAX_POINTS,
) -> Throughput:
    """Completed steps per second per time bucket, averaged over the ranks running in that bucket."""
    t0 = origin_ns(view)
    # per rank: step completion times and how many steps completed at each (1 per raw row; a rollup
    # group counts all its steps at its last one)
    per_rank: list[tuple[np.ndarray, np.ndarray]] = []
    if _from_rollup(view):
        for r in selected_ranks(view, ROLLUP_STEP_TIME, ranks):
            cols = _rollup_cols(view, r, step_range)
            if cols:
                order = np.argsort(cols["ts_ns.max"], kind="stable")
                per_rank.append((cols["ts_ns.max"][order], cols[ROLLUP_ROWS][order]))
    else:
        for r in selected_ranks(view, "step_time", ranks):
            cols = _step_cols(view, r, step_range)
            if cols and len(cols["ts_ns"]):
                ts = cols["ts_ns"]
                if not bool(np.all(ts[1:] >= ts[:-1])):
                    ts = np.sort(ts)
                per_rank.append((ts, np.ones(len(ts), dtype=np.int64)))
    if not per_rank:
        return Throughput(_EMPTY_F, _EMPTY_F, math.nan, 0)
    lo = min(int(ts[0]) for ts, _ in per_rank)
    hi = max(int(ts[-1]) for ts, _ in per_rank)
    steps = min(int(n.sum()) for _, n in per_rank)
    span = max(hi - lo, 1)
    # each bucket should hold ~10 steps (or rollup groups) on average so the rate is not just quantisation noise
    events = min(len(ts) for ts, _ in per_rank)
    n_buckets = int(max(1, min(max_points, events // 10 if events < steps else steps // 10, span // 1_000_000)))
    width = span / n_buckets
    edges = lo + np.arange(1, n_buckets) * width
    total = np.zeros(n_buckets)
    active = np.zeros(n_buckets)
    for ts, counts in per_rank:
        cut = np.searchsorted(ts, edges, side="right")
        done = np.concatenate([[0], np.cumsum(counts)])
        total += np.diff(done[np.concatenate([[0], cut, [len(ts)]])])
        # a rank counts where it was running: between its first and last step (partial buckets too)
        active += (lo + (np.arange(n_buckets) + 1) * width >= ts[0]) & (lo + np.arange(n_buckets) * width <= ts[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(active > 0, total / np.maximum(active, 1) / (width / 1e9), np.nan)
    x = (lo - t0 + (np.arange(n_buckets) + 0.5) * width) / 1e9
    mean = float(
        np.mean(
            [(int(n.sum()) - 1) / max((int(ts[-1]) - int(ts[0])) / 1e9, 1e-9) for ts, n in per_rank if int(n.sum()) > 1]
            or [math.nan]
        )
    )
    return Throughput(x, rate, float(mean), steps)


# --- time-based views -----------------------------------------------------------------------


def _time_trace(
    cols: Mapping[str, np.ndarray],
    column: str,
    t0: int,
    time_range: TimeRange | None,
    scale: float,
    name: str,
    max_points: int,
    rank: int | None = None,
    group: str = "",
) -> Trace | None:
    """One column over time (s since ``t0``), missing values as gaps, reduced to ``max_points``."""
    if column not in cols or "ts_ns" not in cols or not len(cols["ts_ns"]):
        return None
    ts = cols["ts_ns"]
    y = cols[column]
    if len(ts) > 1 and not bool(np.all(ts[1:] >= ts[:-1])):
        order = np.argsort(ts, kind="stable")
        ts, y = ts[order], y[order]
    x = (ts - t0) / 1e9
    if time_range is not None:
        sl = _range_slice(x, time_range[0], time_range[1])
        x, y = x[sl], y[sl]
    yf = y.astype(np.float64)
    if y.dtype.kind in "iu":
        yf[y < 0] = np.nan
    if not len(yf) or bool(np.all(np.isnan(yf))):
        return None
    xs, ys = downsample_minmax(x, yf, max_points)
    return Trace(name, xs, ys * scale, rank=rank, points=len(yf), group=group)


def _where(cols: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {c: v[mask] for c, v in cols.items()}


_GIB = 1.0 / (1024**3)


def memory_series(
    view: StoreView,
    ranks: Iterable[int] | None = None,
    time_range: TimeRange | None = None,
    max_points: int = MAX_POINTS,
) -> MemorySeries:
    """RSS and GPU allocated per rank (process table) and per-step GPU peak (step_memory)."""
    t0 = origin_ns(view)
    rss, alloc, peak = [], [], []
    total = 0.0
    for r in selected_ranks(view, "process", ranks):
        cols = view.columns("process", r)
        t = _time_trace(cols, "rss_bytes", t0, time_range, _GIB, f"rank {r} RSS", max_points, r)
        if t is not None:
            rss.append(t)
        t = _time_trace(cols, "gpu_alloc_bytes", t0, time_range, _GIB, f"rank {r} GPU alloc", max_points, r)
        if t is not None:
            alloc.append(t)
        tot = cols.get("gpu_total_bytes")
        if tot is not None and len(tot) and tot.max() > 0:
            total = max(total, float(tot.max()) * _GIB)
    for r in selected_ranks(view, "step_memory", ranks):
        cols = view.columns("step_memory", r)
        t = _time_trace(cols, "peak_alloc_bytes", t0, time_range, _GIB, f"rank {r} GPU peak", max_points, r)
        if t is not None:
            peak.append(t)
    return MemorySeries(tuple(rss), tuple(alloc), tuple(peak), total)


def system_series(view: StoreView, time_range: TimeRange | None = None, max_points: int = MAX_POINTS) -> SystemSeries:
    """Host CPU / RAM per node and utilisation, memory, temperature and power per GPU."""
    t0 = origin_ns(view)
    cpu: list[Trace] = []
    ram: list[Trace] = []
    ram_total = 0.0
    for r in view.table_ranks("system"):
        cols = view.columns("system", r)
        if "node_rank" not in cols or not len(cols["node_rank"]):
            continue
        for node in np.unique(cols["node_rank"]):
            sub = _where(cols, cols["node_rank"] == node)
            label = f"node {int(node)}"
            t = _time_trace(sub, "cpu_pct", t0, time_range, 1.0, f"{label} CPU", max_points, r, label)
            if t is not None:
                cpu.append(t)
            t = _time_trace(sub, "ram_used_bytes", t0, time_range, _GIB, f"{label} RAM", max_points, r, label)
            if t is not None:
                ram.append(t)
            tot = sub.get("ram_total_bytes")
            if tot is not None and len(tot) and tot.max() > 0:
                ram_total = max(ram_total, float(tot.max()) * _GIB)
    util: list[Trace] = []
    mem: list[Trace] = []
    temp: list[Trace] = []
    power: list[Trace] = []
    for r in view.table_ranks("system_gpu"):
        cols = view.columns("system_gpu", r)
        if "gpu_idx" not in cols or not len(cols["gpu_idx"]):
            continue
        pairs = np.unique(np.stack([cols["node_rank"].astype(np.int64), cols["gpu_idx"].astype(np.int64)]), axis=1)
        for node, gpu in pairs.T:
            sub = _where(cols, (cols["node_rank"] == node) & (cols["gpu_idx"] == gpu))
            label = f"node {int(node)} GPU {int(gpu)}"
            for column, scale, dest in (
                ("util_pct", 1.0, util),
                ("mem_used_bytes", _GIB, mem),
                ("temp_c", 1.0, temp),
                ("power_w", 1.0, power),
            ):
                t = _time_trace(sub, column, t0, time_range, scale, label, max_points, r, label)
                if t is not None:
                    dest.append(t)
    return SystemSeries(tuple(cpu), tuple(ram), ram_total, tuple(util), tuple(mem), tuple(temp), tuple(power))


# --- run information -----------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _fmt_ns(ns: int) -> str:
    import datetime as _dt

    if ns <= 0:
        return "-"
    return _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_info(view: StoreView) -> RunInfo:
    """Everything the header, metadata, environment and integrity panels show."""
    meta = dict(view.meta)
    title = str(meta.get("run_name") or meta.get("name") or meta.get("run_id") or "traceml run")
    rows: list[tuple[str, str]] = []
    for key in sorted(meta):
        value = meta[key]
        rows.append((key, _fmt_ns(value) if key.endswith("_ns") and isinstance(value, int) else _fmt(value)))
    sr = step_range_of(view)
    if sr is not None:
        rows.append(("steps", f"{sr[0]} .. {sr[1]}"))
    t0 = origin_ns(view)
    latest = view.latest_ns
    rolled = _from_rollup(view)
    if rolled:  # the rollup's timestamps are its groups' first and last
        latest = max([int(c["ts_ns.max"].max()) for c in _rollup_per_rank(view, None, None).values()] or [0])
    duration = run_duration_s(view)
    if math.isfinite(duration):
        rows.append(("duration", f"{duration:.1f} s"))
    elif latest and t0:
        rows.append(("duration", f"{(latest - t0) / 1e9:.1f} s"))
    ranks = []
    for r in view.ranks:
        info = view.rank_info.get(r)
        if rolled:
            steps = int(view.columns(ROLLUP_STEP_TIME, r).get(ROLLUP_ROWS, np.zeros(0, np.int64)).sum())
        else:
            steps = view.rows("step_time", r)
        ranks.append(
            (
                str(r),
                info.host if info and info.host else "-",
                info.state if info else "unknown",
                info.exit_status if info and info.exit_status else "-",
                str(steps),
                str(view.dropped(r)),
            )
        )
    env_rows: list[tuple[str, str]] = []
    envs = sorted(k for k in view.attachments if k.startswith("environment/"))
    if envs:
        env = view.attachments[envs[0]]
        if isinstance(env, Mapping):
            env_rows = [(str(k), _fmt(v)) for k, v in sorted(env.items(), key=lambda kv: str(kv[0]))]
        if len(envs) > 1:
            env_rows.append(("(from)", f"{envs[0]} of {len(envs)} environment attachments"))
    integ = view.integrity
    if integ is None:
        status = "live"
        integ_rows = [("status", "live (no file yet)")]
    else:
        status = str(integ.get("status", "unknown"))
        integ_rows = [(str(k), _fmt(v)) for k, v in sorted(integ.items(), key=lambda kv: str(kv[0]))]
    evicted = sum(view.evicted.values())
    if evicted:
        integ_rows.append(("evicted from live window", f"{evicted} rows"))
    dropped = view.dropped()
    if dropped:
        integ_rows.append(("dropped on ranks", f"{dropped} rows"))
    return RunInfo(title, tuple(rows), tuple(ranks), tuple(env_rows), tuple(integ_rows), status, t0)
