"""The name policy (traceml/names.py) where names enter: the grammar itself, ``TmlWriter``,
the reader (old files still read, bad names reported escaped), and the aggregator's ingest with
a hostile peer holding the token (a reserved table is a bad batch of that rank only)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from traceml import names
from traceml.errors import ConfigError
from traceml.format import TmlWriter, open_recording
from traceml.schema import PHASES, STEP_TIME, Column, TableSchema, rows_to_columns
from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, hello, rank_finished

HOSTILE_TABLES = [
    "../../x",
    "/tmp/x",
    "a/../b",
    "..",
    ".hidden",
    "a\\b",
    "[/bold]",
    "a[red]b",
    "x\x1b[31m",
    "x\x1b]0;title\x07",
    "</title><script>alert(1)</script>",
    "a b",
    "",
    "a//b",
    "a/",
    "CON:",
    "x" * (names.MAX_NAME + 1),
    "naïve",
]
GOOD_TABLES = ["step_time", "custom", "a/b", "x.min", "t-1+2", "_private", "rank0/extra", "x" * names.MAX_NAME]


@pytest.mark.parametrize("name", HOSTILE_TABLES)
def test_hostile_table_names_break_the_grammar_and_the_reason_is_escaped(name: str) -> None:
    problem = names.name_problem(name, "table")
    assert problem is not None
    assert "\x1b" not in problem and "\x07" not in problem  # shown escaped, never raw


@pytest.mark.parametrize("name", GOOD_TABLES)
def test_ordinary_names_pass(name: str) -> None:
    assert names.name_problem(name, "table") is None


def test_columns_have_one_part_and_reserved_tables_are_named() -> None:
    assert names.column_problem("forward_us.sum") is None
    assert names.column_problem("a/b") is not None
    assert names.reserved_problem("rollup/step_time") is not None
    assert names.reserved_problem("step_time") is None
    with pytest.raises(ConfigError, match="reserved namespace 'rollup/'"):
        names.check_table("rollup/step_time")


@pytest.mark.parametrize(
    "value", ["a\x1b[2J", "line\nbreak", "nul\x00", "bidi\u202eevil", "c1\x9b31m", "sep\u2028", "x" * 257]
)
def test_labels_refuse_control_characters_and_length(value: str) -> None:
    assert names.label_problem(value, "run id") is not None
    assert names.labels_problem(["fine", value], "column x") is not None


def test_labels_allow_markup_and_unicode() -> None:
    for value in ["</title><script>", "[bold]x[/bold]", "naïve ✓ 名前", "", "a & b"]:
        assert names.label_problem(value, "run name") is None


# --- the writer ------------------------------------------------------------------------------


def _steps(lo: int, hi: int) -> dict[str, Any]:
    rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(lo, hi)]
    return rows_to_columns(STEP_TIME, rows)


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "[/bold]", "x\x1b[31m", "rollup/step_time", ""])
def test_writer_refuses_bad_and_reserved_tables_and_goes_on(tmp_path: Path, name: str) -> None:
    path = tmp_path / "run.tml"
    with TmlWriter(path, run_meta={"run_id": "r"}, fsync_interval_s=None) as w:
        w.append(0, "step_time", _steps(0, 10))
        with pytest.raises(ConfigError) as info:
            w.append(0, name, {"step": np.arange(3)})
        assert "\x1b" not in str(info.value)
        with pytest.raises(ConfigError):
            w.add_schema(TableSchema(name, (Column("step", "i8"),)))
        w.append(0, "step_time", _steps(10, 20))  # the writer is still usable
        w.attach("exit", {"ok": True})
    with open_recording(path) as r:
        assert r.integrity["status"] == "complete" and r.integrity["names"] == []
        assert r.read_table("step_time")[0]["step"].tolist() == list(range(20))
        assert r.tables == ["step_time"] and r.rollup_tables == ["rollup/step_time"]
        assert "exit" in r.attachments


def test_writer_refuses_bad_columns_attachments_header_labels_and_str_values(tmp_path: Path) -> None:
    path = tmp_path / "run.tml"
    for meta in (
        {"run_id": "a\x1bb"},
        {"hosts": ["h\n"]},
        {"command": ["x", "\x1b]52;c;AAAA\x07"]},
        {"run_name": "\x00"},
    ):
        with pytest.raises(ConfigError, match="control character"):
            TmlWriter(path, run_meta=meta)
    with pytest.raises(ConfigError, match="column name"):
        TmlWriter(path, run_meta={}, schemas=[TableSchema("t", (Column("../x", "i8"),))])
    with TmlWriter(path, run_meta={"run_name": "</title><script>"}, fsync_interval_s=None) as w:
        with pytest.raises(ConfigError, match="column name"):
            w.append(0, "custom", {"a b": np.arange(2)})
        with pytest.raises(ConfigError, match="attachment name"):
            w.attach("../../etc/passwd", {})
        with pytest.raises(ConfigError, match="control character"):
            w.append(0, "step_region", {**_region(["ok", "bad\x1b[31m"])})
        w.append(0, "step_region", _region(["forward", "[b]x[/b]"]))
    with open_recording(path) as r:
        assert r.read_table("step_region")[0]["name"].tolist() == ["forward", "[b]x[/b]"]
        assert "custom" not in r.schemas  # a refused first append declares nothing


def _region(labels: list[str]) -> dict[str, Any]:
    from traceml.schema import NUMPY_DTYPES, STEP_REGION

    n = len(labels)
    return {
        c.name: labels if c.dtype == "str" else np.arange(n).astype(NUMPY_DTYPES[c.dtype]) for c in STEP_REGION.columns
    }


def test_a_region_name_with_control_characters_is_made_a_label_at_the_rank() -> None:
    from traceml.runtime.regions import Region

    region = Region("eval\x1b[31m\nstep", lambda: None)
    assert region.name == "eval\ufffd[31m\ufffdstep" and names.label_problem(region.name, "region") is None
    assert Region("x" * 1000, lambda: None).name == "x" * names.MAX_LABEL


# --- the reader: old files (no policy) still read, their bad names are reported ---------------


class _NoPolicy:
    """Stands in for traceml.names in the writer: the writer of an old version checked nothing."""

    MAX_ARG = names.MAX_ARG

    @staticmethod
    def labels_problem(*args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, attr: str) -> Any:
        return lambda value, *args, **kwargs: value


def test_reader_reads_an_old_file_with_hostile_names_and_reports_them_escaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import traceml.format.writer as writer_module

    path = tmp_path / "old.tml"
    with monkeypatch.context() as m:
        m.setattr(writer_module, "names", _NoPolicy())
        meta = {"run_id": "id\x1b[2J", "run_name": "x\x1b]0;pwn\x07", "hosts": ["h"], "command": ["a\nb"]}
        with TmlWriter(path, run_meta=meta, fsync_interval_s=None) as w:
            w.append(0, "step_time", _steps(0, 5))
            w.append(0, "../../x", {"v": np.arange(3), "[red]": np.arange(3)})
            w.append(1, "a\x1b[31m", {"v": np.arange(2)})
            w.attach("/etc/passwd", {"k": 1})
    with open_recording(path) as r:
        assert r.read_table("../../x")[0]["v"].tolist() == [0, 1, 2]  # still read
        assert r.read_table("a\x1b[31m")[1]["v"].tolist() == [0, 1]
        integrity = r.integrity
        problems = integrity["names"]
        assert integrity["status"] == "complete"
        assert "name grammar" in integrity["message"]
        text = "\n".join(problems)
        assert "\x1b" not in text and "\x07" not in text and "\n" not in text.replace("\n", "")
        for needle in ("HEADER.run_id", "HEADER.meta.run_name", "HEADER.command", "'../../x'", "'[red]'"):
            assert needle in text, text
        assert "'/etc/passwd'" in text and "'a\\x1b[31m'" in text
        assert len(problems) == 7


def test_an_old_file_whose_peer_wrote_a_rollup_table_reads_and_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file recorded before the policy, by an aggregator that let a peer write ``rollup/step_time``:
    the stored rollup is not the writer's, so it is reported and read_rollup computes from the rows."""
    import traceml.format.writer as writer_module

    path = tmp_path / "old.tml"
    with monkeypatch.context() as m:
        m.setattr(writer_module, "names", _NoPolicy())
        with TmlWriter(path, run_meta={}, fsync_interval_s=None, rollup_steps=None) as w:
            w.append(0, "step_time", _steps(0, 300))
            w.append(1, "rollup/step_time", {"step": np.arange(2), "junk": np.ones(2)})
    with open_recording(path) as r:
        (problem,) = r.integrity["names"]
        assert "reserved namespace 'rollup/'" in problem
        rolled = r.read_rollup("step_time")
        assert list(rolled) == [0] and int(rolled[0]["rows"].sum()) == 300


# --- the aggregator: a hostile peer holding the token ------------------------------------------

TOKEN = "names-token"
RUN_ID = "names-run"


def _ident(rank: int, world: int) -> RankIdentity:
    return RankIdentity(
        rank=rank, local_rank=rank, world_size=world, local_world_size=world, node_rank=0, host="h", pid=os.getpid()
    )


def test_a_peer_sending_reserved_or_bad_names_is_a_bad_batch_for_that_rank_only(tmp_path: Path) -> None:
    """Found by review: a rank that sent ``rollup/step_time`` (the writer's own namespace) stopped
    the spool; the file kept a fraction of the rows, read "complete" and lacked the exit and rank
    records.  Now each such table is a bad batch of that rank: counted, logged once, and the
    recording and the other ranks go on."""
    from traceml.aggregator.service import Aggregator, AggregatorOptions

    out = tmp_path / "run.tml"
    agg = Aggregator(AggregatorOptions(token=TOKEN, run_id=RUN_ID, out=str(out), expected_ranks=2))
    runner = threading.Thread(target=agg.run, name="aggregator", daemon=True)
    good = bad = None
    try:
        runner.start()
        deadline = time.monotonic() + 30
        while agg.server.port == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        good = TelemetryClient("127.0.0.1", agg.server.port, hello(RUN_ID, TOKEN, _ident(0, 2)))
        bad = TelemetryClient("127.0.0.1", agg.server.port, hello(RUN_ID, TOKEN, _ident(1, 2)))
        good.send(batch(1, {"step_time": encode_columns(STEP_TIME, _steps(0, 50))}))
        good.flush(timeout_s=10)
        rollup_like = TableSchema("rollup/step_time", (Column("step", "i8"), Column("junk", "f8")))
        hostile = {
            "rollup/step_time": encode_columns(rollup_like, {"step": [1, 2], "junk": [1.0, 2.0]}),
            "../../x": encode_columns(TableSchema("../../x", (Column("v", "i8"),)), {"v": [1]}),
            "col": encode_columns(TableSchema("col", (Column("[/bold]", "i8"),)), {"[/bold]": [1]}),
            "lbl": encode_columns(TableSchema("lbl", (Column("s", "str"),)), {"s": ["\x1b]0;x\x07"]}),
            "fine": encode_columns(TableSchema("fine", (Column("v", "i8"),)), {"v": [7]}),
        }
        bad.send(batch(1, hostile))
        bad.send(batch(2, {"step_time": encode_columns(STEP_TIME, _steps(0, 10))}))
        bad.send({"kind": "attachment", "name": "../../evil", "data": {}})
        bad.send(rank_finished("ok"))
        bad.close(drain_timeout_s=10)
        good.send(batch(2, {"step_time": encode_columns(STEP_TIME, _steps(50, 100))}))
        good.send(rank_finished("ok"))
        good.close(drain_timeout_s=10)
        runner.join(60)
    finally:
        for c in (good, bad):
            if c is not None:
                c.close(drain_timeout_s=0.1)
        agg.request_stop()
        runner.join(60)
    assert agg.spool is not None and agg.spool.error == "", agg.spool.error
    assert agg.ingest.stats.bad_batches == 5
    with open_recording(out) as rec:
        assert rec.integrity["status"] == "complete" and rec.integrity["names"] == []
        steps = rec.read_table("step_time")
        assert steps[0]["step"].tolist() == list(range(100))
        assert steps[1]["step"].tolist() == list(range(10))  # the bad rank's good table is kept
        assert rec.read_table("fine")[1]["v"].tolist() == [7]
        assert set(rec.tables) == {"step_time", "fine"}
        assert rec.schemas["rollup/step_time"].names[:3] == ("step", "step_last", "rows")
        assert {"exit", "ranks"} <= set(rec.attachments)
        assert sorted(r["rank"] for r in rec.attachments["ranks"]["ranks"]) == [0, 1]
        rolled = rec.read_rollup("step_time")
        assert int(rolled[0]["rows"].sum()) == 100 and int(rolled[1]["rows"].sum()) == 10


def test_a_hello_with_a_control_character_in_its_host_is_refused() -> None:
    from traceml.errors import HandshakeError
    from traceml.transport.messages import parse_hello

    msg = hello(RUN_ID, TOKEN, _ident(0, 1))
    parse_hello(msg)
    msg["host"] = "node\x1b[2J"
    with pytest.raises(HandshakeError, match="control character"):
        parse_hello(msg)


def test_recover_rewrites_an_old_hostile_file_under_the_policy_and_says_what_it_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import traceml.format.writer as writer_module
    from traceml.format.recover import recover

    path = tmp_path / "old.tml"
    with monkeypatch.context() as m:
        m.setattr(writer_module, "names", _NoPolicy())
        with TmlWriter(path, run_meta={"run_id": "id\x1b[2J", "command": ["a\nb"]}, fsync_interval_s=None) as w:
            w.append(0, "step_time", _steps(0, 5))
            w.append(0, "../../x", {"v": np.arange(3)})
            w.attach("/etc/passwd", {"k": 1})
    result = recover(path, tmp_path / "new.tml")
    assert result.rows == 5
    text = "\n".join(result.unrestored)
    assert "'../../x' left out" in text and "'/etc/passwd' left out" in text and "HEADER run_id" in text
    with open_recording(tmp_path / "new.tml") as r:
        assert r.integrity["status"] == "complete" and r.integrity["names"] == []
        assert r.header["run_id"] == "id\ufffd[2J" and r.header["command"] == ["a\ufffdb"]
        assert r.tables == ["step_time"] and r.attachments["recovered_from"]["unrestored"] == result.unrestored
