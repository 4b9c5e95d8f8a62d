"""The step source of the ``step_time`` rollup (:class:`~traceml.views.stepsource.StepSource`):
what a long recording draws from while it loads.

Means per bucket are exact; quantiles are nan; a line is the groups' min/max envelope.  Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from traceml.schema import ROLLUP_ROWS, ROLLUP_STEP_LAST, rollup_name
from traceml.store import StoreView
from traceml.views.select import StepRange, selected_ranks, sorted_by
from traceml.views.stepsource import JobFigures, StepGrid, bucket_width

#: the per-step table's rollup (traceml.format.rollup)
ROLLUP_STEP_TIME = rollup_name("step_time")


class RollupSteps:
    """The rollup rows of the chosen ranks whose groups overlap the step range (sorted by first step)."""

    exact = False

    def __init__(self, view: StoreView, ranks: Iterable[int] | None, step_range: StepRange | None) -> None:
        self._view = view
        self._range = step_range
        self.chosen = tuple(selected_ranks(view, ROLLUP_STEP_TIME, ranks))
        per_rank = {r: self._rank_cols(r) for r in self.chosen}
        self._cols: dict[int, Mapping[str, np.ndarray]] = {r: c for r, c in per_rank.items() if c}

    def _rank_cols(self, rank: int) -> Mapping[str, np.ndarray]:
        cols = self._view.columns(ROLLUP_STEP_TIME, rank)
        if "step" not in cols or not len(cols["step"]):
            return {}
        cols = sorted_by(cols, "step")
        if self._range is not None:
            keep = (cols[ROLLUP_STEP_LAST] >= self._range[0]) & (cols["step"] <= self._range[1])
            cols = {c: v[keep] for c, v in cols.items()}
            if not len(cols["step"]):
                return {}
        return cols

    def per_rank(self) -> tuple[int, ...]:
        return tuple(self._cols)

    def span(self) -> StepRange | None:
        if not self._cols:
            return None
        return (
            min(int(c["step"].min()) for c in self._cols.values()),
            max(int(c[ROLLUP_STEP_LAST].max()) for c in self._cols.values()),
        )

    def grid(self, max_buckets: int) -> StepGrid:
        """Equal step buckets, a whole number of groups wide (so each group falls in one bucket)."""
        cols = self._cols.values()
        group = max(int((c[ROLLUP_STEP_LAST] - c["step"]).max()) + 1 for c in cols)
        first = min(int(c["step"][0]) for c in cols)
        hi = max(int(c[ROLLUP_STEP_LAST].max()) for c in cols)
        lo = first - first % group
        width = bucket_width(lo, hi, max_buckets)
        width = max(group, -(-width // group) * group)
        return StepGrid(lo, width, (hi - lo) // width + 1)

    def bucket_sums(
        self, rank: int, grid: StepGrid, columns: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cols = self._cols[rank]
        idx = (cols["step"] - grid.lo) // grid.width
        counts = np.bincount(idx, weights=cols[ROLLUP_ROWS], minlength=grid.n)
        sums = {c: np.bincount(idx, weights=cols[f"{c}.sum"], minlength=grid.n) for c in columns if f"{c}.sum" in cols}
        return counts, sums

    def region_sums(self, grid: StepGrid) -> dict[str, np.ndarray]:
        return {}

    def line(self, rank: int, max_points: int) -> tuple[np.ndarray, np.ndarray, int]:
        x, y = _envelope(self._cols[rank], max_points)
        return x, y, self.count(rank)

    def count(self, rank: int) -> int:
        cols = self._cols.get(rank)
        return int(cols[ROLLUP_ROWS].sum()) if cols else 0

    def quantiles(self, rank: int, qs: Sequence[float]) -> list[float]:
        return [math.nan for _ in qs]

    def mean_ms(self, rank: int) -> float:
        steps = self.count(rank)
        cols = self._cols.get(rank)
        total = float(cols["step_us.sum"].sum()) if cols else 0.0
        return max(total / max(steps, 1) / 1000.0, 0.0)

    def figures(self) -> JobFigures:
        if not self._cols:
            return JobFigures()
        means = np.array([self.mean_ms(r) for r in self._cols])
        slowest = self.per_rank()[int(np.argmax(means))]
        skew = math.nan
        if len(means) >= 2 and means.min() > 0:
            skew = float((means.max() - means.min()) / means.min() * 100.0)
        return JobFigures(slowest_rank=slowest, skew_pct=skew)

    def time_span(self) -> tuple[int, int] | None:
        if not self._cols:
            return None
        lo_ns = min(int(c["ts_ns.min"].min()) for c in self._cols.values())
        hi_ns = max(int(c["ts_ns.max"].max()) for c in self._cols.values())
        return lo_ns, hi_ns

    def completions(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        cols = self._cols[rank]
        order = np.argsort(cols["ts_ns.max"], kind="stable")
        return cols["ts_ns.max"][order], cols[ROLLUP_ROWS][order]

    def latest_ns(self) -> int:
        """The rollup's timestamps are its groups' first and last: the last group's end."""
        return max([int(c["ts_ns.max"].max()) for c in self._cols.values()] or [0])


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
