"""The step source of a bounded read (:class:`~traceml.views.stepsource.StepSource`): a recording too long to hold.

Counts, sums, spans and lines from the view's ``step_time`` rollup (exact per group); quantiles from the
whole run's sketches (1%); the run's figures from its exact totals; regions from the held sample.  Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from traceml.store import StoreView
from traceml.views.bounded import STEP_TOTALS
from traceml.views.measures import view_measures
from traceml.views.rawsteps import RawSteps
from traceml.views.rollupsteps import ROLLUP_STEP_TIME, RollupSteps
from traceml.views.select import StepRange, selected_ranks
from traceml.views.stepsource import JobFigures, StepGrid
from traceml.views.totals import StepTotals


class BoundedSteps:
    """Every step of the chosen ranks within the step range, as a bounded read holds them: the
    rollup of every row (``rollup/step_time``), the totals (``view.digests["step_time"]``) and a
    sample of the rows (``step_time``: every stride-th step and each rank's last steps)."""

    exact = False

    def __init__(self, view: StoreView, ranks: Iterable[int] | None, step_range: StepRange | None) -> None:
        chosen = None if ranks is None else tuple(ranks)
        self._view = view
        self._range = step_range
        self._totals: StepTotals = view.digests[STEP_TOTALS]
        self._rolled = RollupSteps(view, chosen, step_range)
        self._sample = RawSteps(view, chosen, step_range)
        self.chosen = self._rolled.chosen
        #: every rank chosen: the totals (which are of all ranks) answer for the run
        self._whole = set(self.chosen) >= set(selected_ranks(view, ROLLUP_STEP_TIME, None))

    def per_rank(self) -> tuple[int, ...]:
        return self._rolled.per_rank()

    def span(self) -> StepRange | None:
        return self._rolled.span()

    def grid(self, max_buckets: int) -> StepGrid:
        return self._rolled.grid(max_buckets)

    def bucket_sums(
        self, rank: int, grid: StepGrid, columns: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self._rolled.bucket_sums(rank, grid, columns)

    def region_sums(self, grid: StepGrid) -> dict[str, np.ndarray]:
        """The sample's region time per bucket, scaled to the bucket's steps (the sample holds a share of them)."""
        sampled = self._sample.region_sums(grid)
        if not sampled:
            return {}
        held = np.zeros(grid.n)
        every = np.zeros(grid.n)
        for r in self._sample.per_rank():
            held += self._sample.bucket_sums(r, grid, ())[0]
        for r in self.per_rank():
            every += self.bucket_sums(r, grid, ())[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(held > 0, every / np.where(held > 0, held, 1), 0.0)
        return {name: values * scale for name, values in sampled.items()}

    def line(self, rank: int, max_points: int) -> tuple[np.ndarray, np.ndarray, int]:
        return self._rolled.line(rank, max_points)

    def count(self, rank: int) -> int:
        return self._rolled.count(rank)

    def quantiles(self, rank: int, qs: Sequence[float]) -> list[float]:
        """The whole run's sketch (steps after the warm-up, 1% relative error); a step range: its
        held sample's (every step of each rank's last ones, every stride-th before)."""
        if self._range is not None:
            return self._sample.quantiles(rank, qs)
        rt = self._totals.per_rank.get(rank)
        if rt is None or not rt.steps:
            return [math.nan for _ in qs]
        return [float(x) for x in rt.step.quantiles(list(qs))]

    def mean_ms(self, rank: int) -> float:
        return self._rolled.mean_ms(rank)

    def figures(self) -> JobFigures:
        """The run's figures as the summary states them (:func:`traceml.views.measures.totals_measures`)
        for the whole run; over a rank selection or a step range, those of the held sample."""
        if not self.per_rank():
            return JobFigures()
        if not (self._whole and self._range is None):
            return self._sample.figures()
        m = view_measures(self._view)
        return JobFigures.of(m)

    def time_span(self) -> tuple[int, int] | None:
        return self._rolled.time_span()

    def completions(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return self._rolled.completions(rank)

    def latest_ns(self) -> int:
        return max(self._rolled.latest_ns(), self._view.latest_ns)
