"""Fuzz the aggregator's socket: random bytes, truncated frames, oversized length prefixes and
well-formed frames that are wrong (bad hellos, ill-typed batches, lying row counts) sent to a
REAL ``python -m traceml.aggregator`` on 127.0.0.1 while a good rank streams steps.

The aggregator never dies, the good rank loses no row, the aggregator's resident memory stays
bounded, and every bad peer is refused or cut off and logged.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traceml.aggregator.control import exit_line
from traceml.format import open_recording
from traceml.schema import PHASES, STEP_TIME, rows_to_columns
from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, encode_frame, hello, rank_finished
from traceml.transport.framing import HEADER

pytestmark = pytest.mark.slow
TOKEN = "fuzz-token"
RUN_ID = "fuzz-run"
#: the aggregator may grow by this much over its size once the good rank streams (one 16 MiB frame
#: buffer for the connection being fuzzed, the live store of the good rank, allocator slack)
RSS_GROWTH_BOUND = 160 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ident(rank: int, world: int = 4) -> RankIdentity:
    return RankIdentity(
        rank=rank, local_rank=rank, world_size=world, local_world_size=world, node_rank=0, host="fuzz", pid=os.getpid()
    )


class Aggregator:
    """``python -m traceml.aggregator`` with a control channel; output goes to files."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.out = tmp_path / "run.tml"
        self.stderr_path = tmp_path / "aggregator.stderr"
        self._stdout = open(tmp_path / "aggregator.stdout", "wb")  # noqa: SIM115 - closed in finish()
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(self.port), "--run-id", RUN_ID]
        cmd += ["--expected-ranks", "4", "--out", str(self.out), "--control-stdin", "--finish-timeout", "5"]
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, "TRACEML_TOKEN": TOKEN},
            stdin=subprocess.PIPE,
            stdout=self._stdout,
            stderr=self._stderr,
        )
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"aggregator did not listen: {self.stderr_path.read_text()}") from None
                time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def finish(self, timeout: float = 60) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(exit_line(0, "", 1.0))
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self._stdout.close()
        self._stderr.close()


class GoodRank(threading.Thread):
    """Rank 0: a batch of 20 step rows every 20 ms until stopped, then rank_finished."""

    def __init__(self, port: int) -> None:
        super().__init__(name="good-rank", daemon=True)
        self.client = TelemetryClient("127.0.0.1", port, hello(RUN_ID, TOKEN, ident(0)), buffer_messages=100_000)
        self.stop = threading.Event()
        self.steps = 0
        self.batches = 0

    def run(self) -> None:
        while not self.stop.is_set():
            rows = [(s, time.time_ns(), 0, 900, *([100] * len(PHASES))) for s in range(self.steps, self.steps + 20)]
            self.batches += 1
            self.client.send(
                batch(self.batches, {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))})
            )
            self.steps += 20
            self.stop.wait(0.02)
        self.client.send(rank_finished("ok"))
        self.client.close(drain_timeout_s=20)


# --- what a bad peer sends ----------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=32),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
    max_leaves=25,
)
kinds = st.sampled_from(["hello", "batch", "attachment", "heartbeat", "rank_finished", "", "nope", "batch\x00"])


def raw_frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def good_batch_wire(n: int = 3) -> dict[str, Any]:
    rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(n)]
    return encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))


@st.composite
def wrong_batch(draw: st.DrawFn) -> bytes:
    """A batch that decodes as msgpack but is wrong in one (or several) ways."""
    wire = good_batch_wire(draw(st.integers(0, 5)))
    msg: dict[str, Any] = {"kind": "batch", "seq": 1, "tables": {"step_time": wire}, "drops": {}}
    for _ in range(draw(st.integers(1, 3))):
        how = draw(
            st.sampled_from(
                [
                    "n",
                    "dtype",
                    "payload",
                    "drop_col",
                    "extra_col",
                    "table_name",
                    "seq",
                    "drops",
                    "tables",
                    "str_col",
                    "field",
                ]
            )
        )
        cols = wire["cols"]
        if how == "n":
            wire["n"] = draw(st.sampled_from([-1, 2**31, 2**62, "3", None, 1.5]))
        elif how == "dtype":
            cols["step"][0] = draw(st.sampled_from(["O", "i16", "", "str", 7, None]))
        elif how == "payload" and isinstance(cols.get("step"), list):
            cols["step"][1] = draw(st.sampled_from([b"\x00" * 7, b"", "abc", [1, 2, 3], None, b"\x01" * 800]))
        elif how == "drop_col":
            cols.pop("ts_ns", None)
        elif how == "extra_col":
            n = wire.get("n")
            rows = n if isinstance(n, int) and 0 < n < 100 else 1
            cols[draw(st.text(max_size=6))] = ["i8", b"\x00" * 8 * rows]
        elif how == "table_name":
            msg["tables"] = {draw(st.sampled_from(["", "x" * 300, "step_gpu", "custom"])): wire}
        elif how == "seq":
            msg["seq"] = draw(st.sampled_from(["1", None, 2**70 // 2**7, -1, True]))
        elif how == "drops":
            msg["drops"] = draw(st.sampled_from([{"step_time": -5}, {"x": "y"}, [], None, {"step_time": 2**63 - 1}]))
        elif how == "tables":
            msg["tables"] = draw(st.sampled_from([[], None, "step_time", {"step_time": []}, {"step_time": {"n": 1}}]))
        elif how == "str_col":
            cols["name"] = ["str", draw(st.sampled_from([[1, 2], ["a", b"b"], "ab", [None]]))]
        else:
            msg[draw(st.text(max_size=6))] = draw(msgpack_values)
    return raw_frame(msg)


@st.composite
def bad_hello(draw: st.DrawFn) -> bytes:
    h = hello(RUN_ID, TOKEN, ident(draw(st.integers(1, 3))))
    how = draw(st.sampled_from(["token", "run_id", "proto", "rank", "type", "missing", "kind"]))
    if how == "token":
        h["token"] = draw(st.sampled_from(["", "wrong", TOKEN + "x", TOKEN[:-1]]))
    elif how == "run_id":
        h["run_id"] = "other-run"
    elif how == "proto":
        h["proto"] = draw(st.sampled_from([0, 2, -1, 2**40]))
    elif how == "rank":
        h["rank"] = draw(st.sampled_from([-1, 4, 2**40]))
        h["world_size"] = draw(st.sampled_from([0, 4, -3]))
    elif how == "type":
        h[draw(st.sampled_from(["rank", "host", "pid", "token"]))] = draw(msgpack_values)
    elif how == "missing":
        h.pop(draw(st.sampled_from(sorted(h))), None)
    else:
        h["kind"] = draw(kinds)
    return raw_frame(h)


def good_hello(rank: int) -> bytes:
    return encode_frame(hello(RUN_ID, TOKEN, ident(rank)))


chunk = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(
        lambda n, tail: HEADER.pack(n) + tail, st.integers(0, 2**32 - 1), st.binary(max_size=64)
    ),  # a truncated frame
    st.builds(lambda obj: raw_frame(obj), st.dictionaries(st.just("kind"), kinds) | msgpack_values),
    st.builds(
        lambda kind, extra: raw_frame({"kind": kind, **extra}),
        kinds,
        st.dictionaries(st.text(max_size=8), msgpack_values, max_size=4),
    ),
    wrong_batch(),
    st.just(raw_frame(msgpack.ExtType(3, b"\x80\x04N."))),
)


@st.composite
def conversation(draw: st.DrawFn) -> list[bytes]:
    opener = draw(st.sampled_from(["good_hello", "bad_hello", "none"]))
    out: list[bytes] = []
    if opener == "good_hello":
        out.append(good_hello(draw(st.integers(1, 3))))
    elif opener == "bad_hello":
        out.append(draw(bad_hello()))
    out += draw(st.lists(chunk, min_size=0 if out else 1, max_size=5))
    return out


def talk(port: int, chunks: list[bytes], linger: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:  # the aggregator already cut us off: that is the point
                return
        if linger:  # wait for the aggregator to judge what it got (hang up or keep listening)
            s.settimeout(0.2)
            try:
                s.recv(1)
            except OSError:
                pass


# --- the tests ---------------------------------------------------------------------------------


def test_fuzzed_peers_never_stop_the_aggregator_nor_the_good_rank(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path)
    good = GoodRank(agg.port)
    rss = {"base": 0, "max": 0}
    try:
        good.start()
        time.sleep(0.5)  # the good rank's first rows are in the live store
        rss["base"] = rss["max"] = agg.rss()

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(chunks=conversation(), linger=st.booleans())
        def fuzz(chunks: list[bytes], linger: bool) -> None:
            talk(agg.port, chunks, linger)
            assert agg.alive, f"the aggregator died: {agg.stderr_path.read_text()[-2000:]}"
            rss["max"] = max(rss["max"], agg.rss())

        fuzz()

        # a flood of connections that never say hello, and a frame that declares 4 GiB
        floods = [socket.create_connection(("127.0.0.1", agg.port), timeout=5) for _ in range(100)]
        for s in floods:
            s.sendall(b"\x00\x00")
        with socket.create_connection(("127.0.0.1", agg.port), timeout=5) as s:
            s.sendall(good_hello(2) + HEADER.pack(2**32 - 1) + b"x" * 1000)
            s.settimeout(10)
            assert s.recv(1) == b"", "a 4 GiB frame must cut the connection"
        for s in floods:
            s.close()
        assert agg.alive
        rss["max"] = max(rss["max"], agg.rss())
    finally:
        good.stop.set()
        good.join(30)
    code = agg.finish()
    log = agg.stderr_path.read_text()
    assert code == 0, log[-3000:]
    assert rss["max"] - rss["base"] < RSS_GROWTH_BOUND, (
        f"aggregator RSS grew from {rss['base'] >> 20} to {rss['max'] >> 20} MiB"
    )
    assert good.client.dropped_messages == 0
    rec = open_recording(agg.out)
    assert rec.integrity["status"] == "complete", rec.integrity
    steps = rec.read_table("step_time", ranks=[0])[0]["step"].tolist()
    assert steps == list(range(good.steps)), f"rank 0 sent {good.steps} steps, the recording has {len(steps)}"
    ranks = {r["rank"]: r for r in rec.attachments["ranks"]["ranks"]}
    assert ranks[0]["state"] == "finished" and ranks[0]["exit_status"] == "ok"
    assert "refused connection" in log and "wrong token" in log, "bad hellos are refused and logged"


def test_batches_whose_columns_do_not_match_their_table_are_skipped_not_fatal(tmp_path: Path) -> None:
    """Found by the fuzzer: a token holder's batch that names a standard table but carries
    another table's columns (or changes a table's column types) used to reach the writer, whose
    refusal stopped the recording for every rank.  Such a batch is a bad batch: counted and
    skipped, while the good rank's rows keep reaching the file."""
    from traceml.aggregator.service import Aggregator, AggregatorOptions
    from traceml.schema import Column, TableSchema

    agg = Aggregator(AggregatorOptions(token=TOKEN, run_id=RUN_ID, out=str(tmp_path / "run.tml"), expected_ranks=2))
    runner = threading.Thread(target=agg.run, name="aggregator", daemon=True)
    good = bad = None
    try:
        runner.start()
        deadline = time.monotonic() + 30
        while agg.server.port == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        good = TelemetryClient("127.0.0.1", agg.server.port, hello(RUN_ID, TOKEN, ident(0, 2)))
        bad = TelemetryClient("127.0.0.1", agg.server.port, hello(RUN_ID, TOKEN, ident(1, 2)))

        def steps(lo: int, hi: int) -> dict[str, Any]:
            rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(lo, hi)]
            return encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))

        good.send(batch(1, {"step_time": steps(0, 50)}))
        good.flush(timeout_s=10)
        as_float = encode_columns(
            TableSchema("step_time", tuple(Column(c.name, "f8") for c in STEP_TIME.columns)),
            rows_to_columns(STEP_TIME, [(1.0,) * 10]),
        )
        custom_a = encode_columns(TableSchema("extra", (Column("a", "i8"),)), {"a": [1, 2]})
        custom_b = encode_columns(TableSchema("extra", (Column("b", "str"),)), {"b": ["x"]})
        bad.send(batch(1, {"step_gpu": steps(0, 5)}))  # step_time's columns under step_gpu's name
        bad.send(batch(2, {"step_time": as_float}))  # the right names, the wrong types
        bad.send(batch(3, {"extra": custom_a}))  # a new table: fine
        bad.send(batch(4, {"extra": custom_b}))  # the same table with other columns
        bad.send(rank_finished("ok"))
        bad.close(drain_timeout_s=10)
        good.send(batch(2, {"step_time": steps(50, 100)}))
        good.send(rank_finished("ok"))
        good.close(drain_timeout_s=10)
        runner.join(60)
    finally:
        for c in (good, bad):
            if c is not None:
                c.close(drain_timeout_s=0.1)
        agg.request_stop()
        runner.join(60)
    assert agg.spool is not None
    assert agg.spool.error == "", agg.spool.error
    assert agg.ingest.stats.bad_batches == 3
    rec = open_recording(tmp_path / "run.tml")
    assert rec.integrity["status"] == "complete"
    assert rec.read_table("step_time")[0]["step"].tolist() == list(range(100))
    assert 1 not in rec.read_table("step_time") and "step_gpu" not in rec.tables
    assert rec.read_table("extra")[1]["a"].tolist() == [1, 2]
