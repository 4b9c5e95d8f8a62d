"""The one choice of a step source (:class:`~traceml.views.stepsource.StepSource`) for a view:
the raw ``step_time`` rows; their rollup while a long recording loads (the view holds the rollup
and not the rows); or a bounded read (its rollup, totals and sample of a recording too long to hold)."""

from __future__ import annotations

from collections.abc import Iterable

from traceml.store import StoreView
from traceml.views.bounded import STEP_TOTALS
from traceml.views.boundedsteps import BoundedSteps
from traceml.views.rawsteps import STEP_TABLE, RawSteps
from traceml.views.rollupsteps import ROLLUP_STEP_TIME, RollupSteps
from traceml.views.select import StepRange
from traceml.views.stepsource import StepSource


def step_source(view: StoreView, ranks: Iterable[int] | None = None, step_range: StepRange | None = None) -> StepSource:
    """The steps of ``ranks`` (all when None) within ``step_range`` (all when None) as ``view`` holds them."""
    if STEP_TOTALS in view.digests and view.has(ROLLUP_STEP_TIME):
        return BoundedSteps(view, ranks, step_range)
    if not view.has(STEP_TABLE) and view.has(ROLLUP_STEP_TIME):
        return RollupSteps(view, ranks, step_range)
    return RawSteps(view, ranks, step_range)
