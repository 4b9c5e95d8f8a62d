"""Figure renderers and the web driver's pure parts (no browser): traces, highlighting, limits, inputs."""

from __future__ import annotations

import json
import threading

import pytest

from traceml import views
from traceml.drivers import web
from traceml.drivers.web.context import ModelCache
from traceml.drivers.web.panels import diagnosis_children
from traceml.errors import ConfigError
from traceml.renderers import figures
from traceml.schema import PHASES
from traceml.store import ColumnStore
from traceml.testing.synthetic import store_from_run, synthetic_run


@pytest.fixture(scope="module")
def view():
    return store_from_run(synthetic_run(ranks=3, steps=600, slow_rank=1, gpu=True, seed=5)).snapshot()


def annotations(fig) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def test_breakdown_figure_stacks_the_chosen_phases_with_median_and_p95(view) -> None:
    bd = views.step_breakdown(view)
    fig = figures.step_breakdown_figure(bd)
    stacked = [t for t in fig.data if t.stackgroup == "phases"]
    assert [t.name for t in stacked] == list(PHASES)
    names = [t.name for t in fig.data]
    assert any(n.startswith("median ") for n in names) and any(n.startswith("p95 ") for n in names)
    fewer = figures.step_breakdown_figure(bd, phases=["forward", "backward"])
    assert [t.name for t in fewer.data if t.stackgroup == "phases"] == ["forward", "backward"]


def test_rank_figure_highlights_the_slowest_rank(view) -> None:
    rs = views.rank_steps(view)
    fig = figures.rank_steps_figure(rs)
    by_rank = {t.meta["rank"]: t for t in fig.data}
    assert set(by_rank) == {0, 1, 2}
    assert by_rank[1].line.color == figures.SLOWEST_COLOR and "slowest" in by_rank[1].name
    assert by_rank[1].line.width > by_rank[0].line.width
    assert "slowest" not in by_rank[0].name and by_rank[0].line.color != figures.SLOWEST_COLOR
    assert fig.data[-1].meta["rank"] == 1  # drawn on top
    assert "skew" in fig.layout.title.text


def test_heatmap_has_one_row_per_rank(view) -> None:
    fig = figures.rank_heatmap_figure(views.rank_steps(view, ranks=[0, 2]))
    (heat,) = fig.data
    assert list(heat.y) == ["rank 0", "rank 2"]
    assert len(heat.z) == 2 and len(heat.z[0]) == len(heat.x)


def test_compare_mode_overlays_b_dashed(view) -> None:
    other = store_from_run(synthetic_run(ranks=2, steps=300, seed=9)).snapshot()
    labels = ("A", "B")
    fig = figures.step_breakdown_figure(views.step_breakdown(view), compare=views.step_breakdown(other), labels=labels)
    b = [t for t in fig.data if t.name.startswith("B · ")]
    assert b and all(t.line.dash in ("dash", "dashdot") for t in b)
    assert all(t.name.startswith(("A · ", "B · ")) for t in fig.data)
    rs = figures.rank_steps_figure(views.rank_steps(view), compare=views.rank_steps(other), labels=labels)
    assert sorted(t.meta["rank"] for t in rs.data if t.name.startswith("B · ")) == [0, 1]
    tp = figures.throughput_figure(views.throughput(view), compare=views.throughput(other), labels=labels)
    assert [t.name for t in tp.data] == ["A · steps/s", "B · steps/s"]


def test_missing_data_says_not_recorded() -> None:
    cpu_only = store_from_run(synthetic_run(ranks=1, steps=100, gpu=False)).snapshot()
    sysm = views.system_series(cpu_only)
    gpu = figures.gpu_figure(sysm)
    assert any("not recorded" in a for a in annotations(gpu))
    # a CPU run's GPU panel is folded into one line: no empty panels, no panel titles
    assert not gpu.data and gpu.layout.height == figures.GPU_NOTE_HEIGHT
    assert annotations(gpu) == ["GPU metrics: not recorded (no NVML GPUs in this run)"]
    mem = figures.memory_figure(views.memory_series(cpu_only))
    # the note is in the title, not inside the plot where it would sit on the RSS line
    assert "GPU memory: not recorded" in mem.layout.title.text and not annotations(mem)
    assert mem.data
    empty = ColumnStore().snapshot()
    assert "no steps recorded" in annotations(figures.step_breakdown_figure(views.step_breakdown(empty)))
    assert "memory: not recorded" in annotations(figures.memory_figure(views.memory_series(empty)))
    assert "system CPU / RAM: not recorded" in annotations(figures.system_figure(views.system_series(empty)))


def test_gpu_figure_draws_four_panels_per_gpu(view) -> None:
    fig = figures.gpu_figure(views.system_series(view))
    groups = {t.meta["group"] for t in fig.data}
    assert groups == {"node 0 GPU 0", "node 0 GPU 1", "node 0 GPU 2"}
    assert len(fig.data) == 4 * len(groups)
    assert sum(1 for t in fig.data if t.showlegend is not False) == len(groups)


def test_no_trace_sends_more_than_the_cap_for_a_long_run() -> None:
    big = store_from_run(synthetic_run(ranks=2, steps=200_000, gpu=True, sample_every=20)).snapshot()
    rs = views.rank_steps(big)
    sysm = views.system_series(big)
    figs = [
        figures.step_breakdown_figure(views.step_breakdown(big)),
        figures.rank_steps_figure(rs),
        figures.throughput_figure(views.throughput(big)),
        figures.memory_figure(views.memory_series(big)),
        figures.system_figure(sysm),
        figures.gpu_figure(sysm),
    ]
    assert all(figures.max_points(f) <= views.MAX_POINTS for f in figs)
    heat = figures.rank_heatmap_figure(rs)
    assert figures.max_points(heat) <= 2 * views.HEATMAP_BUCKETS
    assert all(len(f.to_json()) < 400_000 for f in figs)
    assert max(t.meta["points"] for t in figs[1].data) == 200_000


# --- web driver, pure parts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relayout", "expected"),
    [
        ({"xaxis.range[0]": 10.2, "xaxis.range[1]": 20.9}, (11, 20)),
        ({"xaxis.range": [30, 5]}, (5, 30)),
        ({"xaxis.range[0]": 7.2, "xaxis.range[1]": 7.6}, (7, 7)),
        ({"xaxis.autorange": True, "yaxis.autorange": True}, None),
        ({"autosize": True}, False),
        ({"yaxis.range[0]": 1, "yaxis.range[1]": 2}, False),
        ({"xaxis.range": ["a", "b"]}, False),
        (None, False),
    ],
)
def test_parse_step_range(relayout, expected) -> None:
    assert web.parse_step_range(relayout) == expected


def test_a_zoom_wins_over_redraw_events_that_come_in_with_it() -> None:
    import dash

    zoom = {"xaxis.range": [100, 199]}
    assert web.step_range_update([{"autosize": True}, zoom], None) == [100, 199]
    assert web.step_range_update([zoom, {"autosize": True}], None) == [100, 199]
    assert web.step_range_update([{"autosize": True}], [1, 2]) is dash.no_update
    assert web.step_range_update([zoom], [100, 199]) is dash.no_update
    assert web.step_range_update([{"xaxis.autorange": True}], [100, 199]) is None


def test_the_step_range_follows_the_kept_zoom_or_the_reset_button() -> None:
    import dash

    from traceml.drivers.web.zoom import range_event_update

    kept = {"relayouts": [{"xaxis.range[0]": 99.6, "xaxis.range[1]": 199.2}], "seq": 3}
    assert range_event_update({"step-zoom"}, kept, None) == [100, 199]
    assert range_event_update({"step-zoom"}, kept, [100, 199]) is dash.no_update
    assert range_event_update({"range-reset"}, kept, [100, 199]) is None  # the button wins
    assert range_event_update({"step-zoom", "range-reset"}, kept, None) is dash.no_update
    assert range_event_update({"range-reset"}, None, None) is dash.no_update
    for junk in (None, {}, {"relayouts": "x"}, {"relayouts": [None, 3]}, [1, 2]):
        assert range_event_update({"step-zoom"}, junk, [1, 2]) is dash.no_update


def test_the_browser_keeps_only_relayouts_about_the_x_axis() -> None:
    """The clientside filter names every step chart, in the order of the callback's inputs."""
    from traceml.drivers.web.zoom import zoom_js

    js = zoom_js()
    assert "STEP_AXIS_FIGURES" not in js
    assert js.index("'fig-step-breakdown'") < js.index("'fig-rank-steps'") < js.index("'fig-rank-heatmap'")
    assert all(key in js for key in ("'xaxis.autorange'", "'xaxis.range'", "'xaxis.range[0]'"))


def test_model_cache_reuses_models_per_view_object() -> None:
    cache = ModelCache(size=2)
    a = ColumnStore().snapshot()
    b = ColumnStore().snapshot()
    calls = []

    def build() -> int:
        calls.append(1)
        return len(calls)

    assert cache.get(a, ("k",), build) == 1
    assert cache.get(a, ("k",), build) == 1
    assert cache.get(b, ("k",), build) == 2  # another snapshot: rebuilt
    assert cache.get(a, ("other",), build) == 3
    assert cache.get(a, ("k",), build) == 4  # evicted (size 2)


def test_app_layout_has_the_stable_ids(view) -> None:
    app = web.build_app(lambda: view, live=False)
    layout = json.dumps(app.layout().to_plotly_json(), default=lambda o: o.to_plotly_json())
    for fid in (
        *web.FIGURE_IDS,
        "rank-filter",
        "phase-toggle",
        "step-range",
        "range-reset",
        "diagnosis-panel",
        "meta-panel",
        "integrity-panel",
    ):
        assert f'"{fid}"' in layout
    with pytest.raises(ConfigError, match="refresh_s"):
        web.build_app(lambda: view, live=True, refresh_s=0)


def test_web_server_binds_loopback_and_refuses_a_busy_port(view) -> None:
    app = web.build_app(lambda: view, live=False)
    server = web.WebServer(app, "127.0.0.1", 0)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        with pytest.raises(ConfigError, match="choose another --port"):
            web.WebServer(app, "127.0.0.1", server.port)
    finally:
        server.stop()
    assert web.is_loopback("127.0.0.1") and web.is_loopback("::1") and web.is_loopback("localhost")
    assert not web.is_loopback("0.0.0.0")


def test_serve_answers_http_until_stopped(view) -> None:
    import urllib.request

    stop = threading.Event()
    urls: list[str] = []

    def announce(msg: str) -> None:
        if "http://" in msg:
            urls.append(msg.split()[2])

    thread = threading.Thread(
        target=web.serve, args=(lambda: view,), kwargs={"live": False, "port": 0, "stop": stop, "announce": announce}
    )
    thread.start()
    try:
        for _ in range(200):
            if urls:
                break
            stop.wait(0.05)
        with urllib.request.urlopen(urls[0] + "_dash-layout", timeout=10) as resp:
            body = json.loads(resp.read())
        assert "fig-step-breakdown" in json.dumps(body)
    finally:
        stop.set()
        thread.join()


def test_diagnosis_comes_from_the_recorded_summary_when_there_is_one(view) -> None:
    from traceml.diagnosis import build_summary

    lines, _, source = web.diagnosis_lines(view, use_summary=True)  # no summary attachment: diagnosed here
    assert lines and source == "diagnosed from the rows shown"
    assert lines[0].kind == "STRAGGLER" and lines[0].rank == 1
    store = store_from_run(synthetic_run(ranks=3, steps=600, slow_rank=1, gpu=True, seed=5))
    store.attach("summary", build_summary(store.snapshot()))
    recorded = store.snapshot()
    lines_b, _, source_b = web.diagnosis_lines(recorded, use_summary=True)
    assert source_b.startswith("the run's summary") and [f.kind for f in lines_b] == [f.kind for f in lines]
    children = json.dumps(diagnosis_children(recorded, use_summary=True), default=lambda o: o.to_plotly_json())
    assert "diagnosis-primary" in children and "STRAGGLER" in children


def test_the_rank_box_parses_the_traceml_ranks_syntax_and_says_what_is_wrong() -> None:
    import dash

    from traceml.drivers.web import rank_spec_update

    ranks = list(range(64))
    assert rank_spec_update("0-2, 60", ranks) == ([0, 1, 2, 60], "4 of 64 ranks")
    assert rank_spec_update("  ", ranks) == (ranks, "all 64 ranks")
    assert rank_spec_update("60-70", ranks) == ([60, 61, 62, 63], "4 of 64 ranks")
    value, msg = rank_spec_update("3-1", ranks)
    assert value is dash.no_update and "expected e.g. 0-15,300" in msg
    value, msg = rank_spec_update("abc", ranks)
    assert value is dash.no_update and "'abc' is not a rank or a range" in msg
    value, msg = rank_spec_update("100-200", ranks)
    assert value is dash.no_update and "names no rank of this run (ranks 0-63)" in msg


def test_a_silent_connection_does_not_outlive_the_server(view) -> None:
    # a browser's speculative preconnect opens a connection and never sends a request
    import socket

    from traceml.drivers.web import server as web_server

    app = web.build_app(lambda: view, live=False)
    srv = web.WebServer(app).start()
    silent = socket.create_connection(("127.0.0.1", srv.port))
    try:
        for _ in range(100):  # the server has accepted it and a thread waits on it
            if any(t.name.endswith("(process_request_thread)") for t in threading.enumerate()):
                break
            threading.Event().wait(0.02)
        srv.stop(wait_s=web_server.IDLE_CONNECTION_S + 3)
        waiting = [t for t in threading.enumerate() if t.name.endswith("(process_request_thread)")]
        assert not waiting, "a handler thread still waits on a connection that sent nothing"
        assert silent.recv(1) == b""  # and the server closed it
    finally:
        silent.close()
