"""The step source of raw ``step_time`` rows (:class:`~traceml.views.stepsource.StepSource`):
exact sums, quantiles and the run-level figures of :mod:`traceml.views.measures`.  Pure numpy."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from traceml.schema import PHASES
from traceml.store import StoreView
from traceml.views import steps as _steps
from traceml.views.downsample import downsample_minmax
from traceml.views.measures import view_measures
from traceml.views.select import StepRange, range_slice, selected_ranks, sorted_by
from traceml.views.steps import MAX_REGIONS, OTHER_REGIONS, with_regions
from traceml.views.stepsource import JobFigures, StepGrid, bucket_width

#: the raw per-step table
STEP_TABLE = "step_time"


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


def _region_sums(
    view: StoreView, per_rank: Mapping[int, Mapping[str, np.ndarray]], grid: StepGrid
) -> dict[str, np.ndarray]:
    """Per step bucket, the us of each named region outside the standard phases (summed over ranks)."""
    lo, width, n = grid.lo, grid.width, grid.n
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


class RawSteps:
    """The raw ``step_time`` rows of the chosen ranks within a step range (columns sorted by step)."""

    exact = True

    def __init__(self, view: StoreView, ranks: Iterable[int] | None, step_range: StepRange | None) -> None:
        self._view = view
        self._range = step_range
        self.chosen = tuple(selected_ranks(view, STEP_TABLE, ranks))
        self._cols: dict[int, Mapping[str, np.ndarray]] | None = None

    def _all(self) -> dict[int, Mapping[str, np.ndarray]]:
        if self._cols is None:
            per_rank = {r: self._rank_cols(r) for r in self.chosen}
            self._cols = {r: c for r, c in per_rank.items() if c and len(c["step"])}
        return self._cols

    def _rank_cols(self, rank: int) -> Mapping[str, np.ndarray]:
        cols = self._view.columns(STEP_TABLE, rank)
        if "step" not in cols or not len(cols["step"]):
            return {}
        cols = sorted_by(cols, "step")
        if self._range is None:
            return cols
        sl = range_slice(cols["step"], self._range[0], self._range[1])
        return {c: v[sl] for c, v in cols.items()}

    def per_rank(self) -> tuple[int, ...]:
        return tuple(self._all())

    def span(self) -> StepRange | None:
        if self._range is None and self._cols is None:  # min and max need no sort
            lo, hi = None, None
            for r in self.chosen:
                s = self._view.columns(STEP_TABLE, r).get("step")
                if s is None or not len(s):
                    continue
                a, b = int(s.min()), int(s.max())
                lo = a if lo is None else min(lo, a)
                hi = b if hi is None else max(hi, b)
            return None if lo is None or hi is None else (lo, hi)
        cols = self._all().values()
        if not cols:
            return None
        return min(int(c["step"][0]) for c in cols), max(int(c["step"][-1]) for c in cols)

    def grid(self, max_buckets: int) -> StepGrid:
        span = self.span()
        assert span is not None, "a grid needs a step"
        lo, hi = span
        width = bucket_width(lo, hi, max_buckets)
        return StepGrid(lo, width, (hi - lo) // width + 1)

    def bucket_sums(
        self, rank: int, grid: StepGrid, columns: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cols = self._all()[rank]
        buckets = _Buckets(cols["step"], grid.lo, grid.width, grid.n)
        # int64 sums: a "not measured" -1 costs at most 1 us per row, and means are clipped at 0
        return buckets.counts, {c: buckets.sums(cols[c], grid.n) for c in columns if c in cols}

    def region_sums(self, grid: StepGrid) -> dict[str, np.ndarray]:
        return _region_sums(self._view, self._all(), grid)

    def line(self, rank: int, max_points: int) -> tuple[np.ndarray, np.ndarray, int]:
        cols = self._all()[rank]
        x, y = downsample_minmax(cols["step"], cols["step_us"], max_points)
        return x, y, len(cols["step"])

    def count(self, rank: int) -> int:
        if self._range is None:
            return self._view.rows(STEP_TABLE, rank)
        cols = self._all().get(rank)
        return len(cols["step"]) if cols else 0

    def _valid(self, rank: int) -> np.ndarray:
        cols = self._all().get(rank)
        if not cols:
            return np.empty(0, dtype=np.int64)
        valid = _valid_steps(cols)
        return valid[valid >= 0] if len(valid) and valid.min() < 0 else valid

    def quantiles(self, rank: int, qs: Sequence[float]) -> list[float]:
        return quantiles_us([self._valid(rank)], qs)

    def mean_ms(self, rank: int) -> float:
        valid = self._valid(rank)
        return float(valid.mean()) / 1000.0 if len(valid) else math.nan

    def figures(self) -> JobFigures:
        # the one definition every view shares (traceml.views.measures): on the steps every rank has,
        # after the warm-up for the whole run, over the chosen steps when zoomed
        m = view_measures(self._view, self._range, self.chosen)
        return JobFigures.of(m)

    def time_span(self) -> tuple[int, int] | None:
        lo_ns: int | None = None
        hi_ns: int | None = None
        for cols in self._all().values():
            start = int(cols["ts_ns"][0]) - max(int(cols["step_us"][0]), 0) * 1000
            end = int(cols["ts_ns"][-1])
            lo_ns = start if lo_ns is None else min(lo_ns, start)
            hi_ns = end if hi_ns is None else max(hi_ns, end)
        return None if lo_ns is None or hi_ns is None else (lo_ns, hi_ns)

    def completions(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        ts = self._all()[rank]["ts_ns"]
        if not bool(np.all(ts[1:] >= ts[:-1])):
            ts = np.sort(ts)
        return ts, np.ones(len(ts), dtype=np.int64)

    def latest_ns(self) -> int:
        return self._view.latest_ns
