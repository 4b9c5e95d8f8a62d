"""Trust in every number (issue #15 items 3-5): named regions shown, the time between steps shown,
measured throughput, and one answer per question across the live panel, the end summary, the
report and the dashboard, on real recordings (a real training loop, real ``traceml run`` runs).
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_dashboard_browser import browser, opened, served, traces, wait_traces  # noqa: F401  (browser: a fixture)

import replay
from replay.report import build_report
from traceml import views
from traceml.diagnosis import build_summary
from traceml.renderers.terminal import render_final, render_live
from traceml.store import StoreView
from traceml.views import final_model, live_model
from traceml.views.measures import job_measures, rank_skew, run_duration_s
from traceml.views.steps import step_data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "scripts" / "trust_train.py")
TRACEML = str(Path(sys.executable).parent / "traceml")
SAMPLES = ROOT / "sample_traces"


def text_of(renderable: object, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None, force_terminal=False, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


@pytest.fixture(scope="module")
def regions_view(tmp_path_factory: pytest.TempPathFactory) -> StoreView:
    """A real single-process loop recorded with ``traceml.init(out=...)``: each step spends ~4 ms
    in a ``get_batch`` region, and every 10 steps a 30 ms ``eval`` region runs between steps."""
    out = tmp_path_factory.mktemp("regions") / "run.tml"
    args = ["--out", str(out), "--steps", "40", "--get-batch-ms", "4", "--eval-every", "10", "--eval-ms", "30"]
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    with replay.open(out) as rec:
        return rec.view()


def test_a_region_inside_the_step_is_shown_and_taken_out_of_residual(regions_view: StoreView) -> None:
    s = build_summary(regions_view)
    regions = {r["name"]: r for r in s["regions"]}
    gb = regions["get_batch"]
    assert gb["where"] == "in steps" and gb["calls"] == s["steps"]["count"]
    # the region sleeps 4 ms of a step whose model phases take well under 1 ms
    assert gb["median_ms"] >= 4.0 and gb["share"] > 0.5
    assert gb["outside_phases_share"] == pytest.approx(1.0, abs=0.05)
    # residual is what nobody named: well below the region's time now
    assert s["steps"]["overall"]["residual"]["mean_ms"] < 0.5 * gb["mean_ms"]
    shares = [s["steps"]["overall"][p]["share"] for p in ("dataloader", "h2d", "forward", "backward", "optimizer")]
    assert sum(shares) + s["steps"]["overall"]["residual"]["share"] + gb["share"] == pytest.approx(1.0, abs=0.02)
    # the diagnosis names the region, not "time outside the named phases"
    primary = s["diagnosis"]["primary"]
    assert primary["kind"] == "REGION_HEAVY" and primary["labels"]["region"] == "get_batch"
    assert primary["summary"].startswith("get_batch: ") and "of the step" in primary["summary"]
    assert not any(f["kind"] == "RESIDUAL_HEAVY" for f in s["diagnosis"]["findings"])


def test_time_between_steps_is_its_own_figure_and_throughput_is_measured(regions_view: StoreView) -> None:
    s = build_summary(regions_view)
    steps = s["steps"]
    # three 30 ms evaluations fall inside the analysed steps' span of a few hundred ms
    assert 0.1 < steps["outside_step_share"] < 0.6
    ev = next(r for r in s["regions"] if r["name"] == "eval")
    assert ev["where"] == "between steps" and ev["calls"] == 3
    assert ev["wall_share"] == pytest.approx(steps["outside_step_share"], abs=0.08)
    # measured: steps over their wall time, so the evaluations count against it
    # both figures are rounded to 6 decimals in summary.json (elapsed_s is a fraction of a second here)
    assert steps["throughput_steps_per_s"] == pytest.approx(steps["count"] / steps["elapsed_s"], rel=1e-5)
    assert steps["throughput_steps_per_s"] < 0.9 * 1000 / steps["overall"]["step"]["mean_ms"]


def test_every_screen_shows_the_regions_and_the_time_outside_steps(regions_view: StoreView) -> None:
    s = build_summary(regions_view)
    live = live_model(regions_view)
    final = final_model(regions_view)
    for model in (live, final):
        assert [r.phase for r in model.regions] == ["get_batch"]
        assert model.outside_pct == pytest.approx(
            100 * s["steps"]["outside_step_share"], abs=1e-3 if model is final else 10
        )
        assert [n for n, _ in model.between_regions] == ["eval"]
    final_text = text_of(render_final(final))
    live_text = text_of(render_live(live))
    for text in (final_text, live_text):
        assert "get_batch" in text and "outside steps:" in text and "eval" in text
    report = build_report(regions_view)
    assert "get_batch" in report.html and "get\\_batch" in report.markdown  # Markdown-escaped name
    assert "outside any step" in report.html and "outside any step" in report.markdown


def test_one_answer_per_question_on_a_real_ddp_recording() -> None:
    """The live panel (at the end), the end summary, summary.json, the report and the dashboard
    models say the same median step, slowest rank, skew, throughput, duration and shares."""
    with replay.open(SAMPLES / "ddp_compute_straggler.tml") as rec:
        view = rec.view()
    s = build_summary(view)
    final = final_model(view)
    report = build_report(view)
    bd = views.step_breakdown(view)
    rs = views.rank_steps(view)
    info = dict(views.run_info(view).meta)
    steps = s["steps"]
    med_ms = steps["overall"]["step"]["median_ms"]
    # median step (of the job)
    assert bd.median_ms == pytest.approx(med_ms, rel=1e-6)
    step_row = next(r for r in final.phases if r.phase == "step")
    assert step_row.median_us / 1000 == pytest.approx(med_ms, rel=1e-6)
    # slowest rank and skew
    assert steps["slowest_rank"] == final.slowest_rank == rs.slowest_rank == step_row.worst_rank == 1
    assert steps["rank_skew_pct"] == pytest.approx(final.skew_pct, rel=1e-6)
    assert rs.skew_pct == pytest.approx(final.skew_pct, rel=1e-6)
    # throughput and the time outside steps
    assert final.steps_per_s == pytest.approx(steps["throughput_steps_per_s"], rel=1e-6)
    assert final.outside_pct / 100 == pytest.approx(steps["outside_step_share"], abs=1e-6)
    # shares: the panel's column is summary.json's share
    for row in final.phases:
        if row.phase != "step":
            assert row.share_pct / 100 == pytest.approx(steps["overall"][row.phase]["share"], abs=1e-6)
    # one duration everywhere
    assert info["duration"] == f"{s['run']['duration_s']:.1f} s"
    assert final.duration_s == pytest.approx(s["run"]["duration_s"]) == pytest.approx(run_duration_s(view))
    # the report prints the same figures
    assert f"{med_ms:.2f}" in report.html and f"{steps['throughput_steps_per_s']:.2f} steps/s" in report.html
    # and the live panel over the whole run agrees (its window covers every step here)
    live = live_model(view, window=10_000)
    assert (live.slowest_rank, live.skew_pct) == (final.slowest_rank, final.skew_pct)
    assert live.steps_per_s == final.steps_per_s


def test_a_replay_at_each_moment_matches_what_live_showed(tmp_path: Path) -> None:
    """A real 2-rank DDP recording's rows sent over TCP, batch by batch as the ranks sent them, to a
    real aggregator on 127.0.0.1; at each moment the live panel of the aggregator's store is compared
    with the replay of the file it wrote, advanced to that moment."""
    import time

    from replay.player import Playback
    from traceml.aggregator.service import Aggregator, AggregatorOptions
    from traceml.format import open_recording
    from traceml.schema import STANDARD_TABLES
    from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, hello, rank_finished

    source = open_recording(SAMPLES / "ddp_input_straggler.tml")
    sent = [(r, t, c) for r, t, c in source.iter_batches() if t == "step_time"]
    token = "moments-token"
    opts = AggregatorOptions(
        token=token, run_id="moments", run_name="moments", out=str(tmp_path / "run.tml"), expected_ranks=2
    )
    agg = Aggregator(opts)
    agg.start()
    moments: list[tuple[int, float, int]] = []
    try:
        clients = {}
        for r in (0, 1):
            ident = RankIdentity(
                rank=r, local_rank=r, world_size=2, local_world_size=2, node_rank=0, host="h", pid=1 + r
            )
            clients[r] = TelemetryClient("127.0.0.1", agg.server.port, hello("moments", token, ident))
        rows = {0: 0, 1: 0}
        for seq, (rank, table, cols) in enumerate(sent, 1):
            assert clients[rank].send(batch(seq, {table: encode_columns(STANDARD_TABLES[table], cols)}))
            assert clients[rank].flush(10.0)
            rows[rank] += len(cols["step"])
            deadline = time.monotonic() + 10
            while agg.store.snapshot().rows("step_time", rank) < rows[rank]:
                assert time.monotonic() < deadline, "the aggregator never stored the batch"
                time.sleep(0.01)
            view = agg.store.snapshot()
            if seq % 2 == 0 and len(view.table_ranks("step_time")) == 2:
                live = live_model(view)
                moment = max(int(view.columns("step_time", r)["ts_ns"].max()) for r in (0, 1))
                moments.append((moment, live.skew_pct, live.slowest_rank))
        for client in clients.values():
            client.send(rank_finished("ok"))
            client.close(drain_timeout_s=5.0)
        agg.on_exit({"exit_code": 0, "signal": "", "duration_s": 5.0})
        agg.wait()
    finally:
        agg.finalize()
        agg.close_ui(None)
    assert len(moments) >= 3
    with replay.open(tmp_path / "run.tml") as rec:
        for moment, skew, slowest in moments:
            pb = Playback(rec)
            pb.advance_to(moment)
            replayed = live_model(pb.snapshot())
            assert replayed.slowest_rank == slowest, (moment, skew, replayed.skew_pct)
            assert replayed.skew_pct == pytest.approx(skew, abs=5.0)


def test_lock_step_ranks_show_a_small_skew_even_when_one_rank_lags_in_the_store() -> None:
    """Two ranks in lock step (same step times), rank 1's rows 30 steps behind in the store: the
    skew is taken on the steps both have, so it stays near 0 (comparing each rank's own last 100
    steps read 20-30% on such a job)."""
    from traceml.schema import PHASES, STEP_TIME, rows_to_columns
    from traceml.store import ColumnStore

    rng = np.random.default_rng(3)
    n = 300
    trend = np.linspace(20_000, 40_000, n)  # steps slow down over the run (say, longer sequences)
    store = ColumnStore()
    for rank, upto in ((0, n), (1, n - 30)):
        step_us = (trend * (1 + 0.01 * rng.standard_normal(n))).astype(np.int64)[:upto]
        ts = 1_700_000_000_000_000_000 + np.cumsum(trend.astype(np.int64))[:upto] * 1000
        rows = [(i, int(ts[i]), 0, int(step_us[i]), *([-1] * (len(PHASES) - 1)), int(step_us[i])) for i in range(upto)]
        store.append(rank, "step_time", rows_to_columns(STEP_TIME, rows))
    m = job_measures(step_data(store.snapshot(), last_n=100))
    assert m.common_steps == 70
    assert m.skew_pct < 3.0
    skew, slowest, _ = rank_skew(step_data(store.snapshot(), last_n=100))
    assert skew == m.skew_pct and slowest == m.slowest_rank


def test_a_run_that_dies_before_its_first_step_is_told_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [TRACEML, "run", "--ui", "none", "--out", str(tmp_path / "run.tml"), SCRIPT, "--exit-before-step", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 3, done.stderr
    out = done.stdout + done.stderr
    assert "before its first step" in out and "exit status 3" in out
    assert "is the loop wrapped in traceml.trace_step" not in out
    with replay.open(tmp_path / "run.tml") as rec:
        s = build_summary(rec.view())
    assert "before its first step" in s["diagnosis"]["primary"]["summary"]
    assert "exit status 3" in s["diagnosis"]["primary"]["summary"]


def test_every_traceml_run_option_is_in_the_options_table_of_docs_cli() -> None:
    import typer.main

    from traceml.cli import app

    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    table = [line for line in (ROOT / "docs" / "cli.md").read_text().splitlines() if line.startswith("| `")]
    documented = " ".join(line.split("|")[1] for line in table)
    missing = [
        p.opts[0]
        for p in run.params
        if p.opts[0].startswith("-")
        and not getattr(p, "hidden", False)
        and not any(f"`{o}" in documented or f" {o}`" in documented or f"{o}`" in documented for o in p.opts)
    ]
    assert not missing, f"docs/cli.md's options table lacks {missing}"


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium is missing")
def test_dashboard_region_toggle_outline_free_bands_and_a_one_line_gpu_panel(browser, tmp_path: Path) -> None:  # noqa: F811
    """In a real Chromium: the breakdown stacks the named region beside residual (a toggle puts it
    back into residual), its bands have no outline that could paint over a neighbour's spikes, and
    a CPU run's GPU panel is one line."""
    from replay.dashboard import build_dashboard
    from traceml.drivers.web import FIG_STEP_BREAKDOWN
    from traceml.testing.synthetic import run_meta, synthetic_run, write_recording

    run = synthetic_run(ranks=1, steps=3000, gpu=False, seed=4)
    st = run[0]["step_time"]
    spikes = np.arange(len(st["step"])) % 50 == 0
    extra = np.where(spikes, 20_000, 0).astype(np.int64)
    st["backward_us"] = st["backward_us"] + extra
    st["step_us"] = st["step_us"] + extra
    n = len(st["step"])
    run[0]["step_region"] = {
        "step": st["step"].copy(),
        "ts_ns": st["ts_ns"].copy(),
        "name": ["get_batch"] * n,
        "cpu_us": (st["residual_us"] // 2).astype(np.int64),
        "calls": np.ones(n, np.int32),
        "start_us": np.full(n, -1, np.int64),
    }
    path = tmp_path / "regions.tml"
    write_recording(path, run, meta=run_meta("regions-run", ranks=1))
    bd = views.step_breakdown(replay.open(path).view())
    assert list(bd.regions) == ["get_batch"]

    app, close = build_dashboard(path)
    try:
        with served(app) as server, opened(browser, server.url) as page:
            drawn = wait_traces(page, FIG_STEP_BREAKDOWN, "t.some(tr => tr.name === 'region: get_batch')")
            stacked = [t for t in drawn if t["meta"] and t["meta"]["group"] not in ("stat",)]
            assert [t["name"] for t in stacked][-2:] == ["residual", "region: get_batch"]
            assert all(t["width"] == 0 for t in stacked), stacked
            # the stacked bands (the first traces; the median and p95 lines follow) draw no outline
            strokes = page.evaluate(
                "(k) => Array.from(document.querySelectorAll('#fig-step-breakdown .scatterlayer .trace'))"
                ".slice(0, k).map(g => { const p = g.querySelector('path.js-line');"
                " return p ? parseFloat(getComputedStyle(p).strokeWidth || '0') : 0; })",
                len(stacked),
            )
            assert len(strokes) == len(stacked) and all(w == 0 for w in strokes), strokes
            # the GPU panel is drawn after the first charts: wait for it to leave its "loading" figure
            page.wait_for_function(
                "() => { const t = document.querySelector('#fig-gpu .annotation-text');"
                " return t && !/loading/i.test(t.textContent); }",
                timeout=60_000,
            )
            height = page.evaluate("() => document.querySelector('#fig-gpu').getBoundingClientRect().height")
            assert height < 80, height
            assert "GPU memory: not recorded" in page.inner_text("#fig-memory")
            page.click("#region-toggle input")
            back = wait_traces(page, FIG_STEP_BREAKDOWN, "!t.some(tr => tr.name === 'region: get_batch')")
            assert "residual" in [t["name"] for t in back]
            assert len(traces(page, FIG_STEP_BREAKDOWN)) == len(drawn) - 1
    finally:
        close()


def test_the_live_window_read_from_each_ranks_last_rows_is_the_whole_runs_window() -> None:
    """step_data(last_n) reads only each rank's last N + warm-up rows; the window is the same as the
    last N step numbers of the whole union (ranks lagging, gaps, failed rows)."""
    from traceml.schema import PHASES, STEP_TIME, rows_to_columns
    from traceml.store import ColumnStore
    from traceml.views.steps import union_sorted, warmup_count

    rng = np.random.default_rng(11)
    store = ColumnStore()
    for rank, (lo, hi) in enumerate(((0, 900), (0, 860), (40, 905))):
        steps = np.sort(rng.choice(np.arange(lo, hi), size=(hi - lo) * 9 // 10, replace=False))
        rows = [
            (int(s), 1_700_000_000_000_000_000 + int(s) * 10**7, int(rng.random() < 0.05), 1000, *([-1] * len(PHASES)))
            for s in steps
        ]
        store.append(rank, "step_time", rows_to_columns(STEP_TIME, rows))
    view = store.snapshot()
    ok = [view.columns("step_time", r)["step"][view.columns("step_time", r)["failed"] == 0] for r in range(3)]
    union = union_sorted(ok)
    for n in (1, 7, 100, 400):
        expected = union[warmup_count(len(union)) :][-n:]
        data = step_data(view, last_n=n)
        assert np.array_equal(data.steps, expected), n


def test_a_region_around_the_forward_pass_is_placed_against_the_phases(tmp_path: Path) -> None:
    """A ``trace_time("model")`` around forward + loss: the rows place the region (its start) against
    the phases (their starts), so only the loss computation is taken out of residual, not the forward."""
    out = tmp_path / "wrap.tml"
    args = ["--out", str(out), "--steps", "40", "--wrap-forward"]
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    with replay.open(out) as rec:
        s = build_summary(rec.view())
    model = next(r for r in s["regions"] if r["name"] == "model")
    overall = s["steps"]["overall"]
    assert model["mean_ms"] >= overall["forward"]["mean_ms"]  # the region holds the forward phase
    own_ms = model["outside_phases_share"] * model["mean_ms"]
    # at most the region's time beyond the forward phase is its own (the rest overlaps forward)
    assert own_ms <= model["mean_ms"] - 0.8 * overall["forward"]["mean_ms"]
    assert model["outside_phases_share"] < 0.9
    # phases + residual + the regions' own parts account for the step time (shares of summed time)
    parts = sum(overall[p]["share"] for p in overall if p != "step")
    assert parts + model["outside_phases_share"] * model["share"] == pytest.approx(1.0, abs=0.02)


def test_the_prometheus_share_is_the_share_every_view_shows(regions_view: StoreView) -> None:
    import re

    from traceml.exports.prometheus import render_textfile

    s = build_summary(regions_view)
    text = render_textfile(s)
    got = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^traceml_phase_share_ratio\{[^}]*phase="(\w+)"[^}]*\} (\S+)$', text, re.M)
    }
    assert got and all(got[p] == pytest.approx(s["steps"]["overall"][p]["share"]) for p in got)
