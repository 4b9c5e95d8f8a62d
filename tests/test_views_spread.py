"""A thousand ranks on one screen: the terminal and the dashboard show the distribution of the
ranks' step times (median, p95, the slowest few) instead of one line per rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rich.console import Console

from traceml.drivers.terminal import TerminalDriver
from traceml.errors import ConfigError
from traceml.renderers.figures import rank_steps_figure
from traceml.renderers.terminal import render_live, spread_line
from traceml.testing.synthetic import store_from_run, synthetic_run
from traceml.views import RankRow, live_model, rank_steps
from traceml.views.spread import WIDE_RANKS, filter_ranks, parse_rank_filter, rank_band, rank_spread


def row(rank: int, median_us: float, state: str = "connected") -> RankRow:
    return RankRow(rank, 0, "h", state, 10, 9, median_us, math.nan, -1, -1, -1, 0, 0.0)


def test_rank_spread_is_the_distribution_of_the_rank_medians() -> None:
    ranks = [row(r, 1000.0 + r) for r in range(100)] + [row(100, math.nan, "died")]
    spread = rank_spread(ranks, k=3)
    values = np.arange(1000.0, 1100.0)
    assert spread.measured == 100
    assert spread.median_us == float(np.median(values)) and spread.p95_us == float(np.percentile(values, 95))
    assert spread.worst == ((99, 1099.0), (98, 1098.0), (97, 1097.0))
    assert spread.states == (("connected", 100), ("died", 1))


def test_terminal_at_a_thousand_ranks_stays_one_screen_with_the_distribution() -> None:
    store = store_from_run(synthetic_run(ranks=1024, steps=12, slow_rank=700, sample_every=6))
    model = live_model(store.snapshot())
    console = Console(width=140, record=True, color_system=None)
    console.print(render_live(model))
    text = console.export_text()
    assert len(text.splitlines()) < 60
    assert "1016 more ranks not shown" in text
    line = spread_line(model.ranks)
    assert line.startswith("step median over 1024 ranks: median ")
    assert " 700 " in line.split("slowest", 1)[1]  # the straggler is among the slowest
    squeeze = " ".join(text.replace("│", " ").split())
    assert " ".join(line.split()) in squeeze


def test_dashboard_draws_a_band_and_the_slowest_ranks_beyond_sixteen() -> None:
    store = store_from_run(synthetic_run(ranks=64, steps=200, slow_rank=5))
    rs = rank_steps(store.snapshot())
    fig = rank_steps_figure(rs)
    names = [t.name for t in fig.data]
    assert len(fig.data) == 3 + 5 and len(rs.traces) == 64 > WIDE_RANKS
    assert "median of ranks" in names and "median..p95 of ranks" in names
    assert names[3].startswith("rank 5 ")  # the slowest rank first, drawn red
    band = rank_band(rs)
    assert np.allclose(band.median_ms, np.nanmedian(rs.heat_ms, axis=0))
    assert np.all(band.p95_ms >= band.median_ms)
    assert "across 64 ranks" in fig.layout.title.text
    # a few ranks keep one line each
    few = rank_steps_figure(rank_steps(store_from_run(synthetic_run(ranks=4, steps=50)).snapshot()))
    assert len(few.data) == 4


def test_rank_filter_parses_ranges_and_refuses_the_rest() -> None:
    assert parse_rank_filter("0-3, 7,7") == frozenset({0, 1, 2, 3, 7})
    for bad in ("", "a", "3-1", "-2", "0-99999999"):
        with pytest.raises(ConfigError, match="expected e.g. 0-15,300"):
            parse_rank_filter(bad)


def test_the_terminal_driver_shows_only_the_filtered_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_from_run(synthetic_run(ranks=40, steps=10, sample_every=5))
    monkeypatch.setenv("TRACEML_RANKS", "30-33")
    driver = TerminalDriver(store.snapshot, console=Console(width=140, record=True, color_system=None))
    assert driver.rank_filter == frozenset({30, 31, 32, 33})
    driver.console.print(driver._render())
    text = driver.console.export_text()
    shown = sorted(
        int(line.split()[1]) for line in text.splitlines() if " unknown " in line and line.split()[1].isdigit()
    )
    assert shown == [30, 31, 32, 33]
    assert "more ranks not shown" not in text
    monkeypatch.setenv("TRACEML_RANKS", "oops")  # a bad filter shows every rank, it never breaks the view
    assert TerminalDriver(store.snapshot).rank_filter is None
    model = filter_ranks(live_model(store.snapshot()), frozenset({1, 2}))
    assert [r.rank for r in model.ranks] == [1, 2]
