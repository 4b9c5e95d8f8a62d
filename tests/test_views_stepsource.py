"""Every step source (traceml.views.stepsource.StepSource) answers the interface alike on one
recording: raw rows, the rollup and a bounded read (rollup, totals and a sample) agree with
figures computed here from the rows themselves.
A new implementation joins ``SOURCES`` and must pass the same tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

import replay
from traceml.store import StoreView
from traceml.testing.synthetic import run_meta, synthetic_run, write_recording
from traceml.views import StepRange, StepSource, step_source
from traceml.views.boundedsteps import BoundedSteps
from traceml.views.rawsteps import RawSteps
from traceml.views.rollupsteps import RollupSteps

GROUP = 256  # the rollup's steps per group
STEPS = GROUP * 40
RANKS = 3


BUDGET = 10_000  # rows a bounded read holds, against ~31,000 in the recording

Views = tuple[StoreView, StoreView, StoreView]


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> Views:
    """(rollup-only view, every-row view, bounded view) of one 3-rank recording whose rank 1 is slow."""
    path = tmp_path_factory.mktemp("stepsource") / "run.tml"
    run = synthetic_run(ranks=RANKS, steps=STEPS, slow_rank=1, seed=11, sample_every=500)
    write_recording(path, run, meta=run_meta("stepsource", ranks=RANKS), chunk_steps=3_000)
    with replay.open(path, progress=False) as rec:
        bounded = rec.bounded_view(BUDGET)
        assert bounded.digests and bounded.total_rows() <= BUDGET < sum(rec.rows.values())
        return rec.rollup_store(["step_time"]).snapshot(), rec.view(), bounded


Build = Callable[[Views, "list[int] | None", "StepRange | None"], StepSource]
SOURCES: dict[str, Build] = {
    "raw": lambda v, ranks, rng: RawSteps(v[1], ranks, rng),
    "rollup": lambda v, ranks, rng: RollupSteps(v[0], ranks, rng),
    "bounded": lambda v, ranks, rng: BoundedSteps(v[2], ranks, rng),
}
#: the sources whose quantiles are known (within 1%) though not exact
SKETCHED = {"bounded"}
#: step ranges on group boundaries, where every source holds exactly the same steps
RANGES: list[StepRange | None] = [None, (3 * GROUP, 9 * GROUP - 1), (0, GROUP - 1)]


def _rows(full: StoreView, rank: int, rng: StepRange | None) -> dict[str, np.ndarray]:
    cols = full.columns("step_time", rank)
    order = np.argsort(cols["step"], kind="stable")
    keep = np.ones(len(order), dtype=bool)
    if rng is not None:
        keep = (cols["step"][order] >= rng[0]) & (cols["step"][order] <= rng[1])
    return {c: np.asarray(v)[order][keep] for c, v in cols.items()}


def test_the_view_picks_the_source_it_holds(views: Views) -> None:
    rolled, full, bounded = views
    assert isinstance(step_source(rolled), RollupSteps) and isinstance(step_source(full), RawSteps)
    assert isinstance(step_source(bounded), BoundedSteps)
    assert all(isinstance(step_source(v), StepSource) for v in views)
    assert not step_source(rolled).exact and step_source(full).exact and not step_source(bounded).exact


@pytest.mark.parametrize("rng", RANGES)
@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_counts_sums_and_spans_match_the_rows(views: Views, kind: str, rng: StepRange | None) -> None:
    full = views[1]
    src = SOURCES[kind](views, None, rng)
    assert src.chosen == src.per_rank() == tuple(range(RANKS))
    expected_span = (0, STEPS - 1) if rng is None else rng
    assert src.span() == expected_span
    grid = src.grid(7)
    assert grid.lo <= expected_span[0] and grid.lo + grid.n * grid.width > expected_span[1]
    lo_ns, hi_ns = src.time_span() or (0, 0)
    for r in src.per_rank():
        rows = _rows(full, r, rng)
        assert src.count(r) == len(rows["step"])
        counts, sums = src.bucket_sums(r, grid, ("step_us", "forward_us", "no_such_us"))
        assert "no_such_us" not in sums and len(counts) == grid.n
        assert int(counts.sum()) == len(rows["step"])
        first = (int(rows["step"][0]) - grid.lo) // grid.width
        assert counts[first] > 0  # the bucket of the first step holds it
        for col in ("step_us", "forward_us"):
            assert math.isclose(float(sums[col].sum()), float(rows[col].sum()), rel_tol=1e-12)
        assert math.isclose(src.mean_ms(r), float(rows["step_us"].mean()) / 1000.0, rel_tol=1e-9)
        ts, done = src.completions(r)
        assert bool(np.all(np.diff(ts) >= 0)) and int(done.sum()) == len(rows["step"])
        assert lo_ns <= int(ts[0]) and int(ts[-1]) <= hi_ns == max(hi_ns, int(rows["ts_ns"].max()))
        x, y, points = src.line(r, 40)
        assert points == len(rows["step"]) and 2 <= len(x) == len(y) <= 40
        assert int(np.min(y)) == int(rows["step_us"].min()) and int(np.max(y)) == int(rows["step_us"].max())


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_quantiles_are_exact_or_unknown_and_the_slow_rank_is_found(views: Views, kind: str) -> None:
    full = views[1]
    src = SOURCES[kind](views, None, None)
    for r in src.per_rank():
        exact = np.percentile(_rows(full, r, None)["step_us"], [50, 95])
        got = src.quantiles(r, (0.5, 0.95))
        if src.exact:
            np.testing.assert_allclose(got, exact)
        else:  # unknown, or (a sketch) within its 1% relative accuracy
            assert all(math.isnan(g) or abs(g - e) <= 0.01 * e for g, e in zip(got, exact, strict=True))
        if kind in SKETCHED:
            assert all(math.isfinite(g) for g in got)
    figures = src.figures()
    assert figures.slowest_rank == 1 and figures.skew_pct > 0


@pytest.mark.parametrize("kind", sorted(SKETCHED))
def test_a_sketched_source_states_the_runs_figures_as_every_row_does(views: Views, kind: str) -> None:
    exact = RawSteps(views[1], None, None).figures()
    got = SOURCES[kind](views, None, None).figures()
    # counts, sums and times are exact; the job's median and p95 within the sketch's 1%
    assert got.steps_per_s == pytest.approx(exact.steps_per_s, rel=1e-9)
    assert got.outside_share == pytest.approx(exact.outside_share, rel=1e-9)
    assert got.median_ms == pytest.approx(exact.median_ms, rel=0.01)
    assert got.p95_ms == pytest.approx(exact.p95_ms, rel=0.01)
    assert got.slowest_rank == exact.slowest_rank == 1


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_ranks_and_ranges_without_steps_hold_nothing(views: Views, kind: str) -> None:
    beyond = SOURCES[kind](views, None, (STEPS + 10, STEPS + 20))
    assert beyond.chosen == (0, 1, 2) and beyond.per_rank() == ()
    assert beyond.span() is None and beyond.time_span() is None and beyond.figures().slowest_rank is None
    assert [beyond.count(r) for r in beyond.chosen] == [0, 0, 0]
    other = SOURCES[kind](views, [7], None)
    assert other.chosen == () and other.per_rank() == () and other.span() is None
    only = SOURCES[kind](views, [2, 0], None)
    assert only.per_rank() == (0, 2)
