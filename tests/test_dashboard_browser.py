"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium via playwright): charts drawn
from recordings with the right ranks and steps, the rank filter, the step-range brush (relayout and a
real mouse drag), compare mode, live refresh, and "not recorded" panels.  Screenshots go to tmp_path."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import replay
from replay.dashboard import build_dashboard
from traceml.drivers.web import FIGURE_IDS, WebServer, build_app
from traceml.errors import ConfigError
from traceml.store import ColumnStore
from traceml.testing.synthetic import fill_store, rank_infos, run_meta, synthetic_run, write_recording
from traceml.views import MAX_POINTS
from traceml.views.measures import job_measures
from traceml.views.steps import step_data

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]
TIMEOUT_MS = 60_000

#: what the page's Plotly holds for one chart (decoded arrays come from _fullData)
TRACES_JS = """(id) => {
  const gd = document.querySelector('#' + id + ' .js-plotly-plot');
  if (!gd || !gd._fullData || !gd.data) return null;
  return gd._fullData.map((t, i) => {
    const x = t.x ? Array.from(t.x) : [];
    return {
      name: t.name, type: t.type, meta: gd.data[i].meta || null, n: x.length,
      x0: x.length ? x[0] : null, x1: x.length ? x[x.length - 1] : null,
      color: t.line ? t.line.color : null, width: t.line ? t.line.width : null,
      y: t.type === 'heatmap' ? Array.from(t.y) : (t.y ? Array.from(t.y) : []),
    };
  });
}"""
DRAWN_JS = """(ids) => ids.every(id => {
  const gd = document.querySelector('#' + id + ' .js-plotly-plot');
  return gd && gd._fullLayout && gd.data && !document.querySelector('[data-dash-is-loading="true"]');
})"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium page for the module: its cache keeps Dash's scripts between tests, and its
    renderer process lives as long as the fixture (a page per test would start a new one each time)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = b.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            # Chromium starts its GPU, network and storage helpers with the first page and keeps them
            # for its lifetime: start them here, so they are not taken for a test's leaked children.
            app = build_app(lambda: ColumnStore().snapshot(), live=False)
            with served(app) as server, opened(page, server.url):
                pass
            yield page
        finally:
            page.close()
            b.close()


@contextlib.contextmanager
def served(app: Any) -> Iterator[WebServer]:
    server = WebServer(app, "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def opened(page: Any, url: str) -> Iterator[Any]:
    """``page`` showing the dashboard at ``url``, every chart drawn; left on about:blank afterwards,
    once no callback is in flight (its request thread on the server would outlive the test)."""
    try:
        page.goto(url)
        page.wait_for_function(DRAWN_JS, arg=list(FIGURE_IDS))
        yield page
        page.wait_for_function("() => !document.querySelector('[data-dash-is-loading=\"true\"]')")
    finally:
        page.goto("about:blank")


def shot(page: Any, path: Path, full_page: bool = False) -> None:
    """A screenshot written by us (playwright's ``path=`` starts executor threads that outlive the test)."""
    path.write_bytes(page.screenshot(full_page=full_page))


def traces(page: Any, fig_id: str) -> list[dict]:
    return page.evaluate(TRACES_JS, fig_id)


def wait_traces(page: Any, fig_id: str, predicate_js: str) -> list[dict]:
    """Wait until ``predicate_js`` (a JS expression over ``t``, the traces) holds, then return them."""
    page.wait_for_function(
        f"(id) => {{ const t = ({TRACES_JS})(id); return !!t && t.length > 0 && ({predicate_js}); }}", arg=fig_id
    )
    return traces(page, fig_id)


@pytest.fixture(scope="module")
def gpu_tml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dash") / "gpu.tml"
    run = synthetic_run(ranks=4, steps=2000, gpu=True, slow_rank=2, seed=7, sample_every=20)
    attachments = {
        "ranks": {"ranks": rank_infos(run)},
        "exit": {"exit_code": 0, "status": "ok", "duration_s": 21.0, "signal": ""},
        "environment/rank0": {"python": "3.11.9", "torch": "2.13.0", "host": "node0"},
    }
    write_recording(path, run, meta=run_meta("gpu-run", ranks=4), attachments=attachments, chunk_steps=250)
    return path


@pytest.fixture(scope="module")
def long_tml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dash") / "long.tml"
    run = synthetic_run(ranks=2, steps=100_000, seed=9, sample_every=100)
    write_recording(path, run, meta=run_meta("long-run", ranks=2), chunk_steps=20_000)
    return path


def test_a_recording_draws_every_chart_and_the_rank_filter_redraws_them(browser, gpu_tml: Path, tmp_path: Path) -> None:
    app, close = build_dashboard(gpu_tml)
    try:
        with served(app) as server, opened(browser, server.url) as page:
            per_rank = wait_traces(page, "fig-rank-steps", "t.length === 4")
            assert sorted(t["meta"]["rank"] for t in per_rank) == [0, 1, 2, 3]
            assert all(t["n"] == 2000 and t["x0"] == 0 and t["x1"] == 1999 for t in per_rank)
            slowest = [t for t in per_rank if "slowest" in t["name"]]
            assert [t["meta"]["rank"] for t in slowest] == [2]
            assert slowest[0]["color"] == "#d62728" and slowest[0]["width"] > max(
                t["width"] for t in per_rank if t is not slowest[0]
            )
            (heat,) = traces(page, "fig-rank-heatmap")
            assert heat["type"] == "heatmap" and heat["y"] == ["rank 0", "rank 1", "rank 2", "rank 3"]
            stacked = [
                t
                for t in traces(page, "fig-step-breakdown")
                if t["meta"]
                and t["meta"]["group"] in ("dataloader", "h2d", "forward", "backward", "optimizer", "residual")
            ]
            assert len(stacked) == 6 and all(t["n"] == 2000 for t in stacked)
            # memory and system samples load after the step charts were drawn
            memory = wait_traces(page, "fig-memory", "t.length === 12")
            assert {t["meta"]["rank"] for t in memory} == {0, 1, 2, 3}
            gpus = wait_traces(page, "fig-gpu", "t.length === 16")
            assert len({t["meta"]["group"] for t in gpus}) == 4 and len(gpus) == 16
            assert page.inner_text("#stat-slowest") == "2"
            assert page.inner_text("#integrity-badge") == "complete"
            assert "gpu-run" in page.inner_text("#run-title")
            assert "2.13.0" in page.inner_text("#meta-panel")
            page.wait_for_selector("#diagnosis-primary")
            shot(page, tmp_path / "dashboard.png", full_page=True)

            # phase toggles: the breakdown drops the unchecked phase
            page.locator("#phase-toggle label", has_text="forward").click()
            phases = wait_traces(page, "fig-step-breakdown", "!t.some(tr => tr.meta && tr.meta.group === 'forward')")
            assert {t["meta"]["group"] for t in phases} == {
                "dataloader",
                "h2d",
                "backward",
                "optimizer",
                "residual",
                "stat",
            }

            # the rank filter: every chart redraws for the ranks left
            for rank in (1, 3):
                page.locator("#rank-filter label", has_text=f" {rank}").click()
            per_rank = wait_traces(page, "fig-rank-steps", "t.length === 2")
            assert sorted(t["meta"]["rank"] for t in per_rank) == [0, 2]
            heat = wait_traces(page, "fig-rank-heatmap", "t[0].y.length === 2")
            assert heat[0]["y"] == ["rank 0", "rank 2"]
            mem = wait_traces(page, "fig-memory", "t.length === 6")  # RSS, GPU allocated, GPU peak per rank
            assert {t["meta"]["rank"] for t in mem} == {0, 2}
            assert "over 2 rank(s)" in page.inner_text("#stat-rows")
            shot(page, tmp_path / "filtered.png")
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        close()


def test_the_range_brush_requeries_at_full_resolution(browser, long_tml: Path, tmp_path: Path) -> None:
    with replay.open(long_tml) as rec:
        truth = rec.columns("step_time", 0, steps=(50_000, 50_999))["step_us"] / 1000.0
    app, close = build_dashboard(long_tml)
    try:
        with served(app) as server, opened(browser, server.url) as page:
            full = wait_traces(page, "fig-rank-steps", "t.length === 2")
            assert all(t["n"] <= MAX_POINTS and t["meta"]["points"] == 100_000 for t in full)
            assert all(t["x0"] == 0 and t["x1"] == 99_999 for t in full)
            assert "reduced" in page.inner_text("#range-label")
            # zoom once the recording finished loading (charts drawn or resized under a zoom are
            # covered by test_a_zoom_outlives_the_charts_resizing_while_its_range_is_worked_out)
            page.wait_for_function("() => !document.querySelector('#live-status').innerText")
            page.evaluate(
                "() => Plotly.relayout(document.querySelector('#fig-rank-steps .js-plotly-plot'), {'xaxis.range': [50000, 50999]})"
            )
            zoomed = wait_traces(page, "fig-rank-steps", "t.every(tr => tr.n === 1000)")
            assert all(t["x0"] == 50_000 and t["x1"] == 50_999 for t in zoomed)
            rank0 = next(t for t in zoomed if t["meta"]["rank"] == 0)
            np.testing.assert_allclose(rank0["y"], truth)
            bd = wait_traces(page, "fig-step-breakdown", "t[0].n === 1000")
            assert bd[0]["x0"] == 50_000 and bd[0]["x1"] == 50_999
            assert page.inner_text("#range-label") == "steps 50000 .. 50999 (full resolution)"
            shot(page, tmp_path / "zoomed.png")
            page.click("#range-reset")
            back = wait_traces(page, "fig-rank-steps", "t.every(tr => tr.x1 === 99999)")
            assert all(t["n"] <= MAX_POINTS for t in back)

            # a real mouse drag across the heatmap (another step axis) selects a range too
            box = page.locator("#fig-rank-heatmap .nsewdrag").bounding_box()
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + box["width"] * 0.25, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=8)
            page.mouse.move(box["x"] + box["width"] * 0.75, y, steps=8)
            page.mouse.up()
            page.wait_for_function("() => document.querySelector('#range-label').innerText.startsWith('steps ')")
            lo, hi = (int(v) for v in page.inner_text("#range-label").split()[1:4:2])
            assert 15_000 <= lo < hi <= 85_000 and hi - lo >= 25_000
            dragged = wait_traces(page, "fig-rank-steps", f"t.every(tr => tr.x0 === {lo} && tr.x1 === {hi})")
            assert all(t["meta"]["points"] == hi - lo + 1 for t in dragged)
            page.click("#range-reset")
            wait_traces(page, "fig-rank-heatmap", "t[0].x1 > 99000")
            # the axis the user zoomed shows the whole run again, not the old zoom
            page.wait_for_function(
                "() => { const r = document.querySelector('#fig-rank-heatmap .js-plotly-plot')._fullLayout.xaxis.range;"
                " return r[0] <= 0 && r[1] >= 99000; }"
            )
    finally:
        close()


def test_a_zoom_outlives_the_charts_resizing_while_its_range_is_worked_out(
    browser, long_tml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plotly reports a chart drawn or resized as a relayout too (``{"autosize": true}``, e.g. just
    after the first draw).  One that comes while the server still works out a zoom's step range
    must not replace the zoom: Dash drops the answer to a request that a newer request for the
    same output replaced.  The server holds the zoom until the three step charts were resized."""
    from traceml.drivers.web import callbacks

    armed, asked, go = threading.Event(), threading.Event(), threading.Event()
    step_range = callbacks.step_range

    def held(*args: Any) -> Any:
        if armed.is_set():
            asked.set()
            go.wait(TIMEOUT_MS / 1000)
        return step_range(*args)

    monkeypatch.setattr(callbacks, "step_range", held)
    app, close = build_dashboard(long_tml)
    try:
        with served(app) as server, opened(browser, server.url) as page:
            wait_traces(page, "fig-rank-steps", "t.length === 2")
            page.wait_for_function("() => !document.querySelector('#live-status').innerText")
            armed.set()
            page.evaluate(
                "() => Plotly.relayout(document.querySelector('#fig-rank-steps .js-plotly-plot'), {'xaxis.range': [50000, 50999]})"
            )
            assert asked.wait(TIMEOUT_MS / 1000), "the zoom never reached the server"
            page.evaluate(
                "(ids) => Promise.all(ids.map(id => Plotly.Plots.resize(document.querySelector('#' + id + ' .js-plotly-plot'))))",
                ["fig-step-breakdown", "fig-rank-steps", "fig-rank-heatmap"],
            )
            go.set()
            zoomed = wait_traces(page, "fig-rank-steps", "t.every(tr => tr.n === 1000)")
            assert all(t["x0"] == 50_000 and t["x1"] == 50_999 for t in zoomed)
            page.wait_for_function("() => document.querySelector('#range-label').innerText.startsWith('steps 50000')")
    finally:
        go.set()
        close()


def test_compare_mode_overlays_the_second_recording(browser, gpu_tml: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.tml"
    write_recording(other, synthetic_run(ranks=2, steps=1500, seed=3), meta=run_meta("baseline", ranks=2))
    app, close = build_dashboard(gpu_tml, compare=other)
    try:
        with served(app) as server, opened(browser, server.url) as page:
            per_rank = wait_traces(page, "fig-rank-steps", "t.length === 6")
            b = [t for t in per_rank if t["name"].startswith("B baseline · ")]
            assert sorted(t["meta"]["rank"] for t in b) == [0, 1]
            assert all(t["x1"] == 1499 for t in b)
            assert any(t["name"].startswith("B baseline · step") for t in traces(page, "fig-step-breakdown"))
            assert "baseline" in page.inner_text("#meta-panel")
            assert page.inner_text("#mode-badge") == "compare"
            shot(page, tmp_path / "compare.png")
    finally:
        close()


def test_live_mode_refreshes_from_the_source(browser) -> None:
    run = synthetic_run(ranks=2, steps=600, seed=12, sample_every=20)
    store = ColumnStore(meta=run_meta("live-run", ranks=3))
    fill_store(
        store,
        {
            r: {t: {c: v[: len(v) // 2] for c, v in cols.items()} for t, cols in tables.items()}
            for r, tables in run.items()
        },
    )
    app = build_app(store.snapshot, live=True, refresh_s=0.3)
    with served(app) as server, opened(browser, server.url) as page:
        first = wait_traces(page, "fig-rank-steps", "t.length === 2")
        assert all(t["x1"] == 299 for t in first)
        assert page.inner_text("#integrity-badge") == "live"
        fill_store(
            store,
            {
                r: {t: {c: v[len(v) // 2 :] for c, v in cols.items()} for t, cols in tables.items()}
                for r, tables in run.items()
            },
        )
        extra = synthetic_run(ranks=3, steps=600, seed=13)[2]
        store.append(2, "step_time", extra["step_time"])
        grown = wait_traces(page, "fig-rank-steps", "t.length === 3 && t.every(tr => tr.x1 === 599)")
        assert sorted(t["meta"]["rank"] for t in grown) == [0, 1, 2]
        page.wait_for_function("() => document.querySelectorAll('#rank-filter input').length === 3")


def test_missing_tables_say_not_recorded(browser, tmp_path: Path) -> None:
    cpu = tmp_path / "cpu.tml"
    run = synthetic_run(ranks=1, steps=300, gpu=False, seed=1)
    del run[0]["system"]
    write_recording(cpu, run, meta=run_meta("cpu-run", ranks=1))
    app, close = build_dashboard(cpu)
    try:
        with served(app) as server, opened(browser, server.url) as page:
            page.wait_for_function("() => document.querySelector('#fig-gpu').innerText.includes('not recorded')")
            assert "GPU metrics: not recorded" in page.inner_text("#fig-gpu")
            assert "system CPU / RAM: not recorded" in page.inner_text("#fig-system")
            assert "GPU memory: not recorded" in page.inner_text("#fig-memory")
            assert len(traces(page, "fig-rank-steps")) == 1
    finally:
        close()


def test_a_long_recording_is_drawn_from_its_rollup_then_from_every_row(
    browser, long_tml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from replay import dashboard

    monkeypatch.setattr(dashboard, "ROLLUP_FIRST_ROWS", 1_000)  # long_tml holds 200 000 step rows
    go = threading.Event()
    load_rest = dashboard.RecordingSource._load_rest

    def gated(self: Any) -> None:  # the rows load only when the test has seen the rollup's charts
        go.wait(TIMEOUT_MS / 1000)
        load_rest(self)

    monkeypatch.setattr(dashboard.RecordingSource, "_load_rest", gated)
    app, close = build_dashboard(long_tml)
    try:
        with served(app) as server:
            page = browser
            page.goto(server.url)
            first = wait_traces(page, "fig-rank-steps", "t.length === 2")
            # the rollup's envelope: a min and a max per group of 256 steps
            assert all(t["n"] == 2 * math.ceil(100_000 / 256) for t in first)
            assert page.inner_text("#stat-median") == "loading…"
            assert "rollup" in page.inner_text("#range-label")
            go.set()
            page.wait_for_function(
                "() => document.querySelector('#stat-median').textContent.includes('ms')", timeout=TIMEOUT_MS
            )
            assert "rollup" not in page.inner_text("#range-label")
            with replay.open(long_tml, progress=False) as rec:
                # the job's median step, as summary.json and the live view define it
                job = job_measures(step_data(rec.view()))
            shown = float(page.inner_text("#stat-median").split()[0])
            assert shown == pytest.approx(job.median_step_us / 1000.0, abs=0.001)
            page.goto("about:blank")
    finally:
        close()


def test_a_plotly_bundle_of_ones_own_replaces_plotlys(browser, gpu_tml: Path, tmp_path: Path) -> None:
    import plotly

    bundle = tmp_path / "my-plotly.min.js"
    bundle.write_bytes((Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes())
    app, close = build_dashboard(gpu_tml, plotly_js=bundle)
    requested: list[str] = []

    def note(request: Any) -> None:
        requested.append(request.url)

    browser.on("request", note)
    try:
        with served(app) as server, opened(browser, server.url):
            assert len(wait_traces(browser, "fig-rank-steps", "t.length === 4")) == 4
    finally:
        browser.remove_listener("request", note)
        close()
    assert any(u.endswith("/_traceml/plotly.js") for u in requested)
    assert not any("package_data/plotly.min.js" in u for u in requested)
    with pytest.raises(ConfigError, match="cannot read it"):
        build_app(lambda: ColumnStore().snapshot(), live=False, plotly_js=tmp_path / "missing.js")
    (tmp_path / "not.js").write_text("console.log(1)")
    with pytest.raises(ConfigError, match="does not look like a plotly.js bundle"):
        build_app(lambda: ColumnStore().snapshot(), live=False, plotly_js=tmp_path / "not.js")


def test_many_ranks_get_a_range_box_not_a_checklist(browser, tmp_path: Path) -> None:
    path = tmp_path / "wide.tml"
    run = synthetic_run(ranks=40, steps=50, seed=3, sample_every=10)
    write_recording(path, run, meta=run_meta("wide-run", ranks=40))
    app, close = build_dashboard(path)
    try:
        with served(app) as server, opened(browser, server.url) as page:
            wait_traces(page, "fig-rank-heatmap", "t[0].y.length === 40")
            assert page.locator("#rank-filter input").count() == 0  # no 40 checkboxes
            box = page.locator("#rank-spec")
            box.fill("0-2,30-x")
            box.press("Enter")
            page.wait_for_function("document.querySelector('#rank-spec-msg').innerText.includes('expected')")
            assert "'30-x' is not a rank or a range" in page.inner_text("#rank-spec-msg")
            box.fill("0-2, 35")
            box.press("Enter")
            heat = wait_traces(page, "fig-rank-heatmap", "t[0].y.length === 4")
            assert heat[0]["y"] == ["rank 0", "rank 1", "rank 2", "rank 35"]
            per_rank = wait_traces(page, "fig-rank-steps", "t.length === 4")
            assert sorted(t["meta"]["rank"] for t in per_rank) == [0, 1, 2, 35]
            assert page.inner_text("#rank-spec-msg") == "4 of 40 ranks"
    finally:
        close()
