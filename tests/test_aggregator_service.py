"""The aggregator in-process with its real parts: TelemetryServer on 127.0.0.1, TelemetryClients
as ranks, the spool writing a real .tml in tmp_path, read back with open_recording."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from traceml.aggregator.service import Aggregator, AggregatorOptions, exit_status
from traceml.errors import ConfigError
from traceml.format import open_recording
from traceml.schema import PHASES, PROCESS, STEP_TIME, rows_to_columns
from traceml.store import StoreView
from traceml.transport import RankIdentity, TelemetryClient, attachment, batch, encode_columns, hello, rank_finished

TOKEN = "s3cret-token"
RUN_ID = "run-under-test"


def make_aggregator(tmp_path: Path, **overrides) -> Aggregator:
    opts = AggregatorOptions(
        token=TOKEN,
        run_id=RUN_ID,
        run_name="svc",
        out=str(tmp_path / "run.tml"),
        expected_ranks=2,
        finish_timeout_s=10.0,
    )
    for k, v in overrides.items():
        setattr(opts, k, v)
    return Aggregator(opts)


def rank_client(agg: Aggregator, rank: int, token: str = TOKEN, world: int = 2) -> TelemetryClient:
    ident = RankIdentity(
        rank=rank, local_rank=rank, world_size=world, local_world_size=world, node_rank=0, host="h", pid=100 + rank
    )
    return TelemetryClient("127.0.0.1", agg.server.port, hello(RUN_ID, token, ident))


def step_batch(seq: int, first: int, n: int, drops: dict[str, int] | None = None) -> dict:
    rows = [(s, 1_000_000 + s, 0, 1000, *([100] * len(PHASES))) for s in range(first, first + n)]
    proc = [(1_000_000 + first, 50.0, 1 << 20, 3, 7, -1, -1, -1)]
    tables = {
        "step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows)),
        "process": encode_columns(PROCESS, rows_to_columns(PROCESS, proc)),
    }
    return batch(seq, tables, drops)


class Serving:
    """``with Serving(agg) as run:`` starts the aggregator; on the way out it closes the run
    (``finalize`` + ``close_ui``) and keeps the final view in ``run.view``."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.view: StoreView | None = None

    def __enter__(self) -> Serving:
        self.agg.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.view = self.agg.finalize()
        self.agg.close_ui(None)


def finish(agg: Aggregator, info: dict | None) -> None:
    agg.on_exit(info)
    agg.wait()


def test_two_ranks_one_finishes_one_dies_everything_recorded(tmp_path: Path) -> None:
    agg = make_aggregator(tmp_path)
    with Serving(agg) as run:
        c0, c1 = rank_client(agg, 0), rank_client(agg, 1)
        for seq, first in enumerate(range(0, 500, 100), 1):
            assert c0.send(step_batch(seq, first, 100))
            assert c1.send(step_batch(seq, first, 100, drops={"process": 4}))
        c0.send(attachment("environment/rank0", {"python": "3.11"}))
        c1.send(attachment("exit", {"forged": True}))  # a rank cannot overwrite the run's attachments
        c0.send(rank_finished("ok", {"step_time": 0}))
        c0.close(drain_timeout_s=5.0)
        c1.close(drain_timeout_s=5.0)  # no rank_finished: rank 1 died
        finish(agg, {"kind": "exit", "exit_code": 1, "signal": "", "duration_s": 4.5})
    view = run.view
    assert view is not None
    assert view.rank_info[0].state == "finished" and view.rank_info[0].exit_status == "ok"
    assert view.rank_info[1].state == "died" and view.rank_info[1].died_ns > 0
    assert view.rank_info[1].drops == {"process": 4}
    assert view.rank_info[0].host == "h" and view.rank_info[1].pid == 101
    assert agg.ingest.stats.rows == 2 * (500 + 5)

    rec = open_recording(tmp_path / "run.tml")
    assert rec.integrity["status"] == "complete"
    steps = rec.read_table("step_time")
    assert {r: steps[r]["step"].tolist() for r in steps} == {0: list(range(500)), 1: list(range(500))}
    assert rec.attachments["exit"] == {"exit_code": 1, "status": "failed", "duration_s": 4.5, "signal": ""}
    ranks = {r["rank"]: r for r in rec.attachments["ranks"]["ranks"]}
    assert ranks[1]["state"] == "died" and ranks[0]["state"] == "finished" and ranks[1]["drops"] == {"process": 4}
    assert rec.attachments["environment/rank0"] == {"python": "3.11"}
    assert rec.attachments["exit/rank1"] == {"forged": True}
    summary = rec.attachments["summary"]
    assert summary["run"]["exit_status"] == "failed" and summary["steps"]["last"] == 499
    assert view.meta["recording_bytes"] == (tmp_path / "run.tml").stat().st_size


def test_a_wrong_token_is_refused_and_registers_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agg = make_aggregator(tmp_path, expected_ranks=1)
    with Serving(agg) as run:
        intruder = rank_client(agg, 0, token="guess")
        intruder.send(step_batch(1, 0, 10))
        intruder.flush(timeout_s=2.0)
        deadline = time.monotonic() + 10
        while agg.server.refused < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        intruder.close(drain_timeout_s=0.2)
        assert agg.server.refused >= 1
        assert agg.store.snapshot().rank_info == {}
        good = rank_client(agg, 0, world=1)
        good.send(step_batch(1, 0, 10))
        good.send(rank_finished("ok"))
        good.close(drain_timeout_s=5.0)
        finish(agg, {"exit_code": 0})
    view = run.view
    assert view is not None
    assert view.rows("step_time", 0) == 10
    assert any("wrong token" in r.getMessage() for r in caplog.records)
    assert "guess" not in caplog.text and TOKEN not in caplog.text


def test_multi_node_waits_for_missing_ranks_until_the_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agg = make_aggregator(tmp_path, nnodes=2, finish_timeout_s=0.3)
    with Serving(agg):
        c0 = rank_client(agg, 0)
        c0.send(step_batch(1, 0, 5))
        c0.send(rank_finished("ok"))
        c0.close(drain_timeout_s=5.0)
        with caplog.at_level(logging.WARNING, logger="traceml.aggregator"):
            finish(agg, {"exit_code": 0, "signal": "", "duration_s": 1.0})
    assert any("ranks [1] had not finished" in r.getMessage() for r in caplog.records)
    ranks = {r["rank"]: r for r in open_recording(tmp_path / "run.tml").attachments["ranks"]["ranks"]}
    assert ranks[1] == {"rank": 1, "state": "unknown"}


def test_standalone_aggregator_ends_when_every_rank_is_done(tmp_path: Path) -> None:
    agg = make_aggregator(tmp_path, out=None)
    runner = threading.Thread(target=agg.run)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not agg.server.port and time.monotonic() < deadline:
            time.sleep(0.01)
        clients = [rank_client(agg, r) for r in (0, 1)]
        for c in clients:
            c.send(step_batch(1, 0, 3))
            c.send(rank_finished("ok"))
            c.close(drain_timeout_s=5.0)
        assert agg.finished.wait(20)
    finally:
        agg.request_stop()
        runner.join(20)
    view = agg.store.snapshot()
    assert [view.rank_info[r].state for r in (0, 1)] == ["finished", "finished"]
    assert view.attachments["exit"]["status"] == "unknown"
    assert not (tmp_path / "run.tml").exists()


def test_request_stop_closes_a_run_that_never_ended(tmp_path: Path) -> None:
    agg = make_aggregator(tmp_path)
    agg.start()
    c0 = rank_client(agg, 0)
    c0.send(step_batch(1, 0, 7))
    c0.flush(timeout_s=5.0)
    deadline = time.monotonic() + 10
    while agg.ingest.stats.rows < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    agg.request_stop()
    agg.wait()
    view = agg.finalize()
    agg.close_ui(None)
    c0.close(drain_timeout_s=0.1)
    assert view.rank_info[0].state == "died"  # still connected when the aggregator stopped
    rec = open_recording(tmp_path / "run.tml")
    assert rec.read_table("step_time")[0]["step"].tolist() == list(range(7))
    assert rec.attachments["exit"]["status"] == "unknown"


def test_recording_failure_keeps_the_live_store(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    agg = make_aggregator(tmp_path, out=str(blocker / "run.tml"), expected_ranks=1)
    with Serving(agg) as run:
        c0 = rank_client(agg, 0, world=1)
        c0.send(step_batch(1, 0, 20))
        c0.send(rank_finished("ok"))
        c0.close(drain_timeout_s=5.0)
        finish(agg, {"exit_code": 0})
    view = run.view
    assert view is not None
    assert view.rows("step_time", 0) == 20
    assert "cannot open" in view.meta["recording_error"]


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="token"):
        Aggregator(AggregatorOptions(token=""))
    with pytest.raises(ConfigError, match="--ui"):
        Aggregator(AggregatorOptions(token="t", ui="gui"))


def test_exit_status_words() -> None:
    assert [exit_status(0, ""), exit_status(3, ""), exit_status(130, "SIGINT"), exit_status(None, "")] == [
        "ok",
        "failed",
        "interrupted",
        "unknown",
    ]


def test_web_ui_serves_the_live_store(tmp_path: Path) -> None:
    from traceml.cli.launch_plan import free_port

    port = free_port()
    agg = make_aggregator(tmp_path, ui="web", web_port=port, expected_ranks=1)
    with Serving(agg) as run:
        c0 = rank_client(agg, 0, world=1)
        c0.send(step_batch(1, 0, 30))
        c0.send(rank_finished("ok"))
        c0.close(drain_timeout_s=5.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
            page = resp.read().decode()
        assert resp.status == 200 and "traceml" in page
        finish(agg, {"exit_code": 0})
    view = run.view
    assert view is not None
    assert view.rows("step_time", 0) == 30
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)


def test_web_ui_on_a_busy_port_keeps_recording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        agg = make_aggregator(tmp_path, ui="web", web_port=busy.getsockname()[1], expected_ranks=1)
        with Serving(agg):
            c0 = rank_client(agg, 0, world=1)
            c0.send(step_batch(1, 0, 5))
            c0.send(rank_finished("ok"))
            c0.close(drain_timeout_s=5.0)
            finish(agg, {"exit_code": 0})
    assert "live dashboard unavailable" in capsys.readouterr().err
    assert open_recording(tmp_path / "run.tml").read_table("step_time")[0]["step"].tolist() == list(range(5))


def test_when_the_cli_goes_away_the_aggregator_serves_the_ranks_to_their_end(tmp_path: Path) -> None:
    agg = make_aggregator(tmp_path, expected_ranks=1)
    read_fd, write_fd = os.pipe()
    control = os.fdopen(read_fd, "rb")
    with Serving(agg) as run:
        reader = agg.attach_control(control)
        os.close(write_fd)  # the CLI died: end of the control channel, no exit line
        reader.join(10)
        c0 = rank_client(agg, 0, world=1)
        c0.send(step_batch(1, 0, 9))
        c0.send(rank_finished("ok"))
        c0.close(drain_timeout_s=5.0)
        agg.wait()
    control.close()
    view = run.view
    assert view is not None
    assert view.rows("step_time", 0) == 9
    assert view.attachments["exit"]["status"] == "unknown"


class StuckStream:
    """A stderr nobody drains: every write blocks until released."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.written: list[str] = []

    def write(self, text: str) -> int:
        self.gate.wait()
        self.written.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_notices_without_a_live_view_never_block_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    from traceml.aggregator import service

    stuck = StuckStream()
    monkeypatch.setattr(sys, "stderr", stuck)
    ui = service._UI()
    for i in range(service.MAX_QUEUED_NOTICES + 50):  # returns at once although nothing is written
        ui.notify(f"notice {i}")
    assert stuck.written == []
    stuck.gate.set()
    ui.stop(None)
    assert stuck.written[0] == "traceml: notice 0\n"
    assert stuck.written[-1].startswith("traceml: ") and "notices were not shown" in stuck.written[-1]
