"""Benchmark the dashboard's first render on a large recording (no assertions; target <= 2 s).

    .venv/bin/python benchmarks/bench_dashboard.py [--ranks 8] [--steps 1000000] [--file run.tml] [--no-browser]

Writes (or reuses, with ``--file``) a synthetic GPU recording of ``ranks`` x ``steps`` steps with
TmlWriter, then measures:

* loading: ``replay.open`` (index only), the rollup of step_time (what the first charts draw
  from: a row per 256 steps, format 1.1), and as baselines step_time alone and the whole view;
* the server-side build of the charts: from the rollup (first render) and from every row (once
  the recording loaded), and a brushed range of 2 000 steps re-queried at full resolution;
* a baseline in the same run: the per-rank chart built from every raw point (no reduction);
* in headless Chromium (/usr/bin/chromium): a fresh dashboard (*serving*: what ``traceml replay
  --ui web`` does before it prints the URL) and a new tab's navigation to the first drawn chart
  and to every chart, three times in one browser: cold cache, 2nd and 3rd visit (Chromium reuses
  compiled scripts from the third load on); the same over a 10-step recording is the baseline
  (what the page costs whatever the data), and with ``--plotly-js`` the same with that bundle;
  then the wait for the exact statistics (every row loaded behind the page) and a brush
  (relayout) to its redraw.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

import replay
from replay.dashboard import build_dashboard
from traceml import views
from traceml.diagnosis import build_summary
from traceml.drivers.web import FIGURE_IDS, WebServer
from traceml.drivers.web.panels import diagnosis_children
from traceml.renderers import figures
from traceml.store import StoreView
from traceml.testing.synthetic import rank_infos, run_meta, store_from_run, synthetic_run, write_recording

CHROMIUM = "/usr/bin/chromium"
#: rows per rank the aggregator's live store keeps (its summary is built from them)
LIVE_WINDOW = 200_000
#: steps in the brushed range: the most that is still drawn point for point (MAX_POINTS)
BRUSH = views.MAX_POINTS
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FIRST_JS = "() => { const g = document.querySelector('#fig-step-breakdown .js-plotly-plot'); return !!(g && g._fullData && g._fullData.length && g.querySelector('.scatterlayer .trace')); }"
#: the charts a rollup view draws (the others wait for their tables)
ROLLUP_CHARTS = ("fig-step-breakdown", "fig-rank-steps", "fig-rank-heatmap", "fig-throughput")
ALL_JS = """(ids) => ids.every(id => { const g = document.querySelector('#' + id + ' .js-plotly-plot');
  return g && g._fullLayout && g.data; }) && !document.querySelector('[data-dash-is-loading="true"]')"""


def make_recording(path: Path, ranks: int, steps: int) -> None:
    t = time.perf_counter()
    run = synthetic_run(ranks=ranks, steps=steps, gpu=True, sample_every=100, seed=1, slow_rank=ranks - 1)
    # the summary a real run carries: built by the aggregator at the end from its live window
    # (the last LIVE_WINDOW steps of each rank)
    tail = {
        r: {
            t: {c: v[len(v) - max(1, len(v) * LIVE_WINDOW // steps) :] for c, v in cols.items()}
            for t, cols in tables.items()
        }
        for r, tables in run.items()
    }
    summary = build_summary(store_from_run(tail, run_meta("bench", ranks=ranks)).snapshot())
    attachments = {
        "ranks": {"ranks": rank_infos(run)},
        "exit": {"exit_code": 0, "status": "ok", "duration_s": 0.0, "signal": ""},
        "environment/rank0": {"python": "3.11", "torch": "2.13.0"},
        "summary": summary,
    }
    write_recording(path, run, meta=run_meta("bench", ranks=ranks), attachments=attachments, chunk_steps=10_000)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")


def timed(fn: Callable[[], Any], rounds: int = 3) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def first_render(view: StoreView, rng: tuple[int, int] | None = None) -> dict[str, tuple[int, int]]:
    """Every chart of the first render as the app builds it: {chart: (json bytes, most points per trace)}."""
    bd = views.step_breakdown(view, None, rng)
    rs = views.rank_steps(view, None, rng)
    window = views.step_range_to_time(view, rng)
    sysm = views.system_series(view, window)
    figs = {
        "fig-step-breakdown": figures.step_breakdown_figure(bd),
        "fig-rank-steps": figures.rank_steps_figure(rs),
        "fig-rank-heatmap": figures.rank_heatmap_figure(rs),
        "fig-throughput": figures.throughput_figure(views.throughput(view, None, rng)),
        "fig-memory": figures.memory_figure(views.memory_series(view, None, window)),
        "fig-system": figures.system_figure(sysm),
        "fig-gpu": figures.gpu_figure(sysm),
    }
    return {k: (len(f.to_json()), figures.max_points(f)) for k, f in figs.items()}


def naive_rank_figure(view: StoreView) -> int:
    fig = go.Figure()
    for r in view.table_ranks("step_time"):
        cols = view.columns("step_time", r)
        fig.add_trace(go.Scatter(x=cols["step"], y=cols["step_us"] / 1000.0, mode="lines", name=f"rank {r}"))
    return len(fig.to_json())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def replay_page(
    context: Any, path: Path, port: int, prefix: str, label: str, plotly_js: Path | None = None
) -> list[tuple[str, float]]:
    """One ``traceml replay --ui web`` start: serving (open + first view + app), then a new tab's
    navigation to the first drawn chart and to every chart drawn, in the browser *context*."""
    t = time.perf_counter()
    app, close = build_dashboard(path, progress=False, plotly_js=plotly_js)
    serving = time.perf_counter() - t
    server = WebServer(app, port=port).start()
    try:
        page = context.new_page()
        page.set_default_timeout(300_000)
        t = time.perf_counter()
        page.goto(server.url)
        page.wait_for_function(FIRST_JS, polling=10)
        first = time.perf_counter() - t
        page.wait_for_function(ALL_JS, arg=list(FIGURE_IDS), polling=10)
        every = time.perf_counter() - t
        page.close()
    finally:
        server.stop()
        close()
    return [
        (f"{prefix}serving ({label})", serving),
        (f"{prefix}first chart drawn ({label})", first),
        (f"{prefix}every chart drawn ({label})", every),
        (f"{prefix}serving + first chart ({label})", serving + first),
    ]


def browser_times(path: Path, steps: int, tiny: Path, plotly_js: Path | None) -> list[tuple[str, float]]:
    """Cold: a fresh Chromium; warm: the same Chromium again (its cache holds the page's scripts,
    as a browser that opened the dashboard before).  Each page is a fresh dashboard on one port."""
    from playwright.sync_api import sync_playwright

    out: list[tuple[str, float]] = []
    port = _free_port()
    with sync_playwright() as pw:
        pages = [("baseline, 10 steps: ", tiny, None), ("", path, None)]
        if plotly_js is not None:
            pages.append(("plotly cartesian bundle: ", path, plotly_js))
        for prefix, recording, bundle in pages:
            # a fresh on-disk browser profile, as a user's: its HTTP cache and V8's code cache (which
            # an incognito context does not keep) last across the visits; Chromium compiles from its
            # code cache only scripts it has seen before, so the third visit is the returning user's
            with tempfile.TemporaryDirectory(prefix="bench-chromium-") as profile:
                context = pw.chromium.launch_persistent_context(
                    profile, executable_path=CHROMIUM, args=ARGS, viewport={"width": 1400, "height": 1800}
                )
                try:
                    for label in ("cold cache", "2nd visit", "3rd visit"):
                        out += replay_page(context, recording, port, prefix, label, bundle)
                finally:
                    context.close()

        app, close = build_dashboard(path, progress=False)
        server = WebServer(app).start()
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                page.set_default_timeout(300_000)
                page.goto(server.url)
                page.wait_for_function(ALL_JS, arg=list(FIGURE_IDS), polling=10)
                t = time.perf_counter()
                page.wait_for_function(
                    "() => !document.querySelector('#stat-median') ||"
                    " document.querySelector('#stat-median').textContent.includes('ms')",
                    polling=50,
                )
                out.append(("browser: exact statistics shown after the rows loaded", time.perf_counter() - t))
                page.wait_for_function("() => !document.querySelector('#live-status').innerText", polling=50)
                lo, brush = steps // 4, min(BRUSH, steps // 2)
                t = time.perf_counter()
                page.evaluate(
                    "(r) => Plotly.relayout(document.querySelector('#fig-rank-steps .js-plotly-plot'), {'xaxis.range': r})",
                    [lo, lo + brush - 1],
                )
                page.wait_for_function(
                    "(n) => { const g = document.querySelector('#fig-rank-steps .js-plotly-plot');"
                    " return g._fullData.length && g._fullData.every(t => t.x.length === n); }",
                    arg=brush,
                    polling=10,
                )
                out.append((f"browser: brush {brush} steps -> redrawn at full resolution", time.perf_counter() - t))
            finally:
                browser.close()
        finally:
            server.stop()
            close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--file", type=Path, default=None, help="keep the recording here (reused if it exists)")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument(
        "--plotly-js",
        type=Path,
        default=None,
        help="also measure the page with this plotly.js bundle (TRACEML_PLOTLY_JS), e.g. plotly-cartesian.min.js",
    )
    args = ap.parse_args()

    tmp = None
    path = args.file
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "bench.tml"
    if not path.exists():
        make_recording(path, args.ranks, args.steps)
    try:
        print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
        rows: list[tuple[str, float, str]] = []
        s, rec = timed(lambda: replay.open(path, progress=False), 1)
        rows.append(("replay.open (header + index)", s, f"{len(rec.segments)} segments"))
        s, rolled = timed(lambda: rec.rollup_store(["step_time"]).snapshot(), 3)
        groups = rolled.total_rows("rollup/step_time")
        rows.append(("load the rollup of step_time (the first charts' data)", s, f"{groups:,} rollup rows"))
        s, _ = timed(lambda: rec.load(["step_time"]), 1)
        n = rec.rows["step_time"]
        rows.append(("baseline: load step_time (every row)", s, f"{n:,} rows, {n / s / 1e6:.1f} M rows/s"))
        s, view = timed(rec.view, 1)
        rows.append(("load the rest -> StoreView", s, f"{view.total_rows():,} rows in all"))
        rec.close()

        first_render(view)  # warm plotly's validators once, as build_app does
        s, built = timed(lambda: first_render(rolled), 3)
        kb = sum(b for k, (b, _) in built.items() if k in ROLLUP_CHARTS) / 1024
        rows.append(("server: the step charts from the rollup (first render)", s, f"{kb:,.0f} KiB JSON"))
        s, built = timed(lambda: first_render(view), 3)
        kb = sum(b for b, _ in built.values()) / 1024
        most = max(p for k, (_, p) in built.items() if k != "fig-rank-heatmap")
        rows.append(
            ("server: every chart from every row (once loaded)", s, f"{kb:,.0f} KiB JSON, <= {most} points/trace")
        )
        for chart in ("fig-step-breakdown", "fig-rank-steps"):
            fn = {
                "fig-step-breakdown": lambda: figures.step_breakdown_figure(views.step_breakdown(view)).to_json(),
                "fig-rank-steps": lambda: figures.rank_steps_figure(views.rank_steps(view)).to_json(),
            }[chart]
            s1, _ = timed(fn, 3)
            rows.append((f"  {chart}", s1, ""))
        s_sum, _ = timed(lambda: diagnosis_children(view, use_summary=True), 1)
        rows.append(("  diagnosis panel from the recorded summary", s_sum, "replay of a finished run"))
        s_diag, _ = timed(lambda: diagnosis_children(view), 1)
        rows.append(
            ("  diagnosis panel, diagnosed here (crashed file)", s_diag, "after the first charts, own callback")
        )
        lo = args.steps // 2
        s, zoom = timed(lambda: first_render(view, (lo, lo + BRUSH - 1)), 3)
        rows.append((f"server: brush {BRUSH} steps, every chart", s, f"{zoom['fig-rank-steps'][1]} points/trace"))
        s_naive, naive_bytes = timed(lambda: naive_rank_figure(view), 1)
        rows.append(("baseline: per-rank chart from every raw point", s_naive, f"{naive_bytes / 1e6:,.0f} MB JSON"))

        if not args.no_browser and os.path.exists(CHROMIUM):
            with tempfile.TemporaryDirectory() as small:
                tiny = Path(small) / "tiny.tml"
                write_recording(tiny, synthetic_run(ranks=1, steps=10), meta=run_meta("tiny", ranks=1))
                for label, s in browser_times(path, args.steps, tiny, args.plotly_js):
                    rows.append((label, s, ""))

        print(f"\n{'what':66} {'seconds':>8}  notes")
        for label, s, note in rows:
            print(f"{label:66} {s:8.3f}  {note}")
        rank_chart = next(s for label, s, _ in rows if label == "  fig-rank-steps")
        print(f"\nreduced per-rank chart vs raw points: {s_naive / rank_chart:.0f}x faster to build")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
