"""Terminal replay: a run recorded by the real aggregator replays to the same live view, byte for
byte; playback order, windows, speeds and follow mode through the real terminal driver.

Regenerate the golden snapshot on purpose with ``TRACEML_REGEN_GOLDEN=1`` and review the diff of
``tests/golden/replay_end_state.txt``.
"""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import replay
from replay.player import Bound, Playback, follow, parse_bound, parse_speed, play, resolve_window
from traceml.aggregator.service import Aggregator, AggregatorOptions
from traceml.errors import ConfigError
from traceml.format import TmlWriter
from traceml.renderers.terminal import render_live
from traceml.schema import STANDARD_TABLES
from traceml.testing.synthetic import START_NS, run_meta, synthetic_run, write_recording
from traceml.transport import RankIdentity, TelemetryClient, attachment, batch, encode_columns, hello, rank_finished
from traceml.views import live_model

GOLDEN = Path(__file__).parent / "golden" / "replay_end_state.txt"
TOKEN = "replay-token"
WIDTH = 100


def to_text(view, width: int = WIDTH) -> str:
    console = Console(record=True, width=width, color_system=None, force_terminal=False, file=io.StringIO())
    console.print(render_live(live_model(view)))
    return console.export_text()


def console_buffer(width: int = WIDTH) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, color_system=None, force_terminal=False), buf


# --- the same run, live and replayed -------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 2-rank run sent over TCP to a real aggregator that writes run.tml; its final live view."""
    where = tmp_path_factory.mktemp("agg")
    cwd = os.getcwd()
    os.chdir(where)  # a relative recording path, so the rendered view does not depend on the tmp dir
    opts = AggregatorOptions(
        token=TOKEN, run_id="replay-run", run_name="golden", out="run.tml", expected_ranks=2, start_ns=START_NS
    )
    agg = Aggregator(opts)
    try:
        agg.start()
    except BaseException:
        os.chdir(cwd)
        raise
    run = synthetic_run(ranks=2, steps=600, gpu=True, slow_rank=1, seed=21, sample_every=30)
    try:
        clients = []
        for r in run:
            ident = RankIdentity(
                rank=r, local_rank=r, world_size=2, local_world_size=2, node_rank=0, host="gpu-node", pid=700 + r
            )
            clients.append(TelemetryClient("127.0.0.1", agg.server.port, hello("replay-run", TOKEN, ident)))
        for seq, a in enumerate(range(0, 600, 100), 1):
            for r, client in enumerate(clients):
                tables = {}
                for name, cols in run[r].items():
                    n = len(cols["ts_ns"])
                    lo, hi = a * n // 600, (a + 100) * n // 600
                    if hi > lo:
                        tables[name] = encode_columns(STANDARD_TABLES[name], {c: v[lo:hi] for c, v in cols.items()})
                assert client.send(batch(seq, tables))
        for r, client in enumerate(clients):
            client.send(attachment(f"environment/rank{r}", {"python": "3.11", "torch": "2.13"}))
            client.send(rank_finished("ok"))
            client.close(drain_timeout_s=5.0)
        agg.on_exit({"exit_code": 0, "signal": "", "duration_s": 7.5})
        agg.wait()
    finally:
        live_view = agg.finalize()
        agg.close_ui(None)
        os.chdir(cwd)
    return where, live_view


def test_replayed_end_state_renders_exactly_like_the_live_view(recorded, monkeypatch: pytest.MonkeyPatch) -> None:
    where, live_view = recorded
    monkeypatch.chdir(where)
    console, buf = console_buffer()
    with replay.open("run.tml") as rec:
        end = play(rec, speed=None, console=console)
        whole = rec.view()
    assert to_text(end) == to_text(live_view)
    assert to_text(whole) == to_text(live_view)
    assert end.rank_info == live_view.rank_info
    assert {k: end.meta.get(k) for k in live_view.meta} == dict(live_view.meta)  # replay adds only header facts
    for key, cols in live_view.tables.items():
        assert all(np.array_equal(cols[c], end.tables[key][c]) for c in cols), key
    assert to_text(live_view) in buf.getvalue()  # --speed max printed it (then the summary)
    # the file's size varies with the host name and pids in it
    text = re.sub(r"\(\d+(\.\d+)?[KMG]?i?B\)", lambda m: "(<size>)".ljust(len(m.group(0))), to_text(end))
    if os.environ.get("TRACEML_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert GOLDEN.exists(), f"{GOLDEN} is missing; create it with TRACEML_REGEN_GOLDEN=1"
    assert text == GOLDEN.read_text(encoding="utf-8"), "the replayed end state differs from the golden file"


def test_speed_max_prints_the_end_state_once_then_the_summary(recorded) -> None:
    where, _ = recorded
    console, buf = console_buffer()
    with replay.open(where / "run.tml") as rec:
        play(rec, speed=None, console=console)
    out = buf.getvalue()
    assert out.count("╭─ traceml ─") == 1 and out.count("╭─ traceml summary") == 1
    assert out.index("╭─ traceml ─") < out.index("╭─ traceml summary")
    assert "finished" in out and "step 599" in out


# --- playback ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.tml"
    run = synthetic_run(ranks=2, steps=400, seed=8, sample_every=20)
    attachments = {
        "exit": {"exit_code": 0, "status": "ok", "duration_s": 4.0, "signal": ""},
        "environment/rank0": {"python": "3.11"},
    }
    write_recording(path, run, attachments=attachments, chunk_steps=50, segment_max_bytes=8 << 10)
    return path


def test_playback_appends_rows_in_time_order_and_ends_with_the_whole_view(small_tml: Path) -> None:
    with replay.open(small_tml) as rec:
        pb = Playback(rec)
        whole = rec.view()
        assert pb.snapshot().total_rows() == 0
        assert pb.snapshot().meta["status"] == "running"
        assert "exit" not in pb.snapshot().attachments and "environment/rank0" in pb.snapshot().attachments
        mid = pb.t_begin + (pb.t_end - pb.t_begin) // 2
        pb.advance_to(mid)
        half = pb.snapshot()
        for (table, rank), cols in whole.tables.items():
            due = int(np.count_nonzero(cols["ts_ns"] <= mid))
            assert half.rows(table, rank) == due, (table, rank)
        assert {i.state for i in half.rank_info.values()} == {"connected"}
        end = pb.finish()
    assert end.total_rows() == whole.total_rows()
    assert end.meta == whole.meta and end.attachments == whole.attachments and end.rank_info == whole.rank_info
    assert to_text(end) == to_text(whole)


def test_play_follows_the_clock_at_the_given_speed(small_tml: Path) -> None:
    fake = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        fake[0] += s

    console, buf = console_buffer()
    with replay.open(small_tml) as rec:
        pb_duration = Playback(rec).duration_s
        end = play(rec, speed=10.0, console=console, clock=lambda: fake[0], sleep=sleep, refresh_s=0.05)
    assert fake[0] == pytest.approx(pb_duration / 10, abs=0.06)
    assert all(s <= 0.05 + 1e-9 for s in slept)
    assert end.total_rows("step_time") == 800
    assert "traceml summary" in buf.getvalue()


def test_windows_keep_only_the_rows_inside(small_tml: Path) -> None:
    with replay.open(small_tml) as rec:
        start = rec.start_ns
        by_step = Playback(rec, Bound("step", 100), Bound("step", 199)).finish()
        assert by_step.columns("step_time", 0)["step"].tolist() == list(range(100, 200))
        ts = by_step.columns("process", 0)["ts_ns"]
        steps_ts = by_step.columns("step_time", 0)["ts_ns"]
        assert len(ts) and ts.min() >= steps_ts.min() - 20_000_000 and ts.max() <= steps_ts.max()
        by_time = Playback(rec, parse_bound("1"), parse_bound("2.5s")).finish()
        t = by_time.columns("step_time", 1)["ts_ns"]
        assert t.min() >= start + 1_000_000_000 and t.max() <= start + 2_500_000_000
        mixed = Playback(rec, parse_bound("step:50"), parse_bound("2")).finish()
        s = mixed.columns("step_time", 0)
        assert s["step"].min() == 50 and s["ts_ns"].max() <= start + 2_000_000_000
        with pytest.raises(ConfigError, match="before"):
            resolve_window(rec.load(), start, Bound("step", 10), Bound("step", 5))


def test_bound_and_speed_parsing() -> None:
    assert parse_bound("90") == Bound("time", 90.0)
    assert parse_bound("12.5s") == Bound("time", 12.5)
    assert parse_bound("step:500") == Bound("step", 500.0)
    assert str(parse_bound("STEP=7")) == "step:7"
    for bad in ("", "abc", "step:", "-3", "1h"):
        with pytest.raises(ConfigError, match="expected"):
            parse_bound(bad)
    assert parse_speed("1") == 1.0 and parse_speed("10") == 10.0 and parse_speed("max") is None
    assert parse_speed("inf") is None
    for bad in ("0", "-1", "fast", "nan", "1e400x"):
        with pytest.raises(ConfigError, match="--speed"):
            parse_speed(bad)


# --- follow -------------------------------------------------------------------------------------


def test_follow_draws_a_growing_file_until_its_footer(tmp_path: Path) -> None:
    path = tmp_path / "growing.tml"
    run = synthetic_run(ranks=1, steps=300, seed=2)
    cols = run[0]["step_time"]
    writer = TmlWriter(path, run_meta=run_meta(ranks=1), segment_max_bytes=1024, fsync_interval_s=None)
    result: list = []
    console, buf = console_buffer()
    try:
        writer.append(0, "step_time", {k: v[:100] for k, v in cols.items()})
        writer.tick()
        rec = replay.open(path, follow=True)
        stop = threading.Event()
        thread = threading.Thread(
            target=lambda: result.append(follow(rec, console=console, poll_s=0.02, refresh_s=0.05, stop=stop))
        )
        thread.start()
        try:
            writer.append(0, "step_time", {k: v[100:] for k, v in cols.items()})
            writer.attach("exit", {"exit_code": 0, "status": "ok", "duration_s": 3.0, "signal": ""})
            writer.close()
            thread.join(30)
            assert not thread.is_alive(), "follow did not stop at the footer"
        finally:
            stop.set()
            thread.join()
            rec.close()
    finally:
        writer.close()
    (view,) = result
    assert view.columns("step_time", 0)["step"].tolist() == list(range(300))
    assert view.meta["status"] == "finished" and view.integrity["status"] == "complete"
    assert "traceml summary" in buf.getvalue()


def test_follow_stops_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "stalled.tml"
    run = synthetic_run(ranks=1, steps=50, seed=3)
    console, buf = console_buffer()
    with TmlWriter(path, run_meta=run_meta(ranks=1), segment_max_bytes=1024, fsync_interval_s=None) as writer:
        writer.append(0, "step_time", run[0]["step_time"])
        writer.tick()
        with replay.open(path, follow=True) as rec:
            stop = threading.Event()
            stop.set()
            view = follow(rec, console=console, poll_s=0.01, stop=stop)
    assert 0 < view.rows("step_time", 0) <= 50  # the writer's open segment is not on disk yet
    assert view.meta["status"] == "running" and view.integrity["status"] == "recovered"
