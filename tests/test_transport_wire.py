"""Both ends of the wire against each other over real sockets on 127.0.0.1.

Waits use a generous liveness timeout (never an assertion on speed): a condition that does not
hold within it fails the test.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest

from traceml.errors import ConfigError, HandshakeError
from traceml.schema import PROCESS, STEP_REGION, STEP_TIME, rows_to_columns, table
from traceml.transport import (
    PROTOCOL_VERSION,
    BaseHandler,
    Connection,
    RankIdentity,
    TelemetryClient,
    TelemetryServer,
    attachment,
    batch,
    decode_tables,
    encode_columns,
    encode_frame,
    heartbeat,
    hello,
    rank_finished,
)

TOKEN = "tok-3f9a-expected"
WAIT_S = 10.0


class Recorder(BaseHandler):
    """Collects handler calls; ``wait`` blocks until a condition on them holds."""

    def __init__(self) -> None:
        self.hellos: list[Connection] = []
        self.messages: list[tuple[Connection, dict[str, Any]]] = []
        self.closes: list[tuple[Connection, str]] = []
        self._cond = threading.Condition()

    def on_hello(self, conn: Connection) -> None:
        with self._cond:
            self.hellos.append(conn)
            self._cond.notify_all()

    def on_message(self, conn: Connection, msg: dict[str, Any]) -> None:
        with self._cond:
            self.messages.append((conn, msg))
            self._cond.notify_all()

    def on_close(self, conn: Connection, reason: str) -> None:
        with self._cond:
            self.closes.append((conn, reason))
            self._cond.notify_all()

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [m for _, m in self.messages if m["kind"] == kind]

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self._cond:
            ok = self._cond.wait_for(predicate, WAIT_S)
        assert ok, f"timed out waiting for {what}"


def wait_until(predicate: Callable[[], bool], what: str, step: Callable[[], object] | None = None) -> None:
    event = threading.Event()
    for _ in range(int(WAIT_S / 0.02)):
        if predicate():
            return
        if step is not None:
            step()
        event.wait(0.02)
    assert predicate(), f"timed out waiting for {what}"


def identity(rank: int = 0, world: int = 1) -> RankIdentity:
    return RankIdentity(
        rank=rank, local_rank=rank, world_size=world, local_world_size=world, node_rank=0, host="h", pid=100 + rank
    )


def step_batch(seq: int, rows: int = 4, drops: dict[str, int] | None = None) -> dict[str, Any]:
    st_rows = [(seq * 100 + i, 1_000 + i, 0, 500, 10, 20, 200, 150, 80, 40) for i in range(rows)]
    return batch(seq, {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, st_rows))}, drops)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def closed_by_peer(sock: socket.socket) -> bool:
    """Read until the server closes the connection (EOF or reset)."""
    sock.settimeout(WAIT_S)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(recorder: Recorder) -> Iterator[TelemetryServer]:
    srv = TelemetryServer("127.0.0.1", 0, TOKEN, recorder).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., TelemetryClient]]:
    made: list[TelemetryClient] = []

    def make(port: int, rank: int = 0, token: str = TOKEN, world: int = 1, **kw: Any) -> TelemetryClient:
        client = TelemetryClient("127.0.0.1", port, hello("run-1", token, identity(rank, world)), **kw)
        made.append(client)
        return client

    yield make
    for c in made:
        c.close(drain_timeout_s=0.5)


@pytest.fixture
def raw() -> Iterator[Callable[[int], socket.socket]]:
    socks: list[socket.socket] = []

    def connect(port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
        return s

    yield connect
    for s in socks:
        s.close()


def good_hello(rank: int = 0, change: dict[str, Any] | None = None) -> bytes:
    return encode_frame({**hello("run-1", TOKEN, identity(rank)), **(change or {})})


# --- round trips --------------------------------------------------------------------


def test_hello_and_batch_round_trip_with_several_tables(server, recorder, make_client) -> None:
    custom = table("my_custom_table", ("step", "i8"), ("loss", "f4"), ("tag", "str"))
    st_cols = rows_to_columns(STEP_TIME, [(i, 10 + i, i % 2, 100, 1, 2, 3, 4, 5, 85) for i in range(64)])
    reg_cols = rows_to_columns(STEP_REGION, [(i // 2, 10 + i, ("attn", "mlp")[i % 2], 7, 1) for i in range(10)])
    custom_cols = {"step": np.arange(3), "loss": np.array([0.5, np.nan, 0.25], np.float32), "tag": ["a", "", "ü"]}
    client = make_client(server.port, rank=2, world=4)
    msg = batch(
        7,
        {
            "step_time": encode_columns(STEP_TIME, st_cols),
            "step_region": encode_columns(STEP_REGION, reg_cols),
            custom.name: encode_columns(custom, custom_cols),
        },
        {"step_time": 3},
    )
    assert client.send(attachment("environment/rank2", {"python": "3.11", "gpus": []}))
    assert client.send(msg)
    assert client.send(rank_finished("ok", {"step_time": 3}))
    recorder.wait(lambda: len(recorder.messages) == 3, "three messages")

    conn = recorder.hellos[0]
    assert conn.identity == identity(2, 4) and conn.rank == 2 and conn.run_id == "run-1"
    assert conn.peer.startswith("127.0.0.1:")
    got = recorder.kinds("batch")[0]
    assert got["seq"] == 7 and got["drops"] == {"step_time": 3}
    tables = decode_tables(got["tables"])
    assert tables["step_time"][0] == STEP_TIME
    for name in STEP_TIME.names:
        np.testing.assert_array_equal(tables["step_time"][1][name], st_cols[name])
    assert tables["step_region"][1]["name"] == reg_cols["name"]
    assert tables[custom.name][0] == custom  # a table the aggregator has never heard of
    np.testing.assert_array_equal(tables[custom.name][1]["loss"], custom_cols["loss"])
    assert tables[custom.name][1]["tag"] == ["a", "", "ü"]
    assert recorder.kinds("attachment")[0]["data"] == {"python": "3.11", "gpus": []}
    assert recorder.kinds("rank_finished")[0]["status"] == "ok"
    hello_bytes = len(encode_frame(hello("run-1", TOKEN, identity(2, 4))))
    assert conn.messages == 3 and conn.frames == 4
    assert conn.bytes_received == client.sent_bytes + hello_bytes

    client.close()
    recorder.wait(lambda: len(recorder.closes) == 1, "on_close")
    assert recorder.closes[0] == (conn, "eof")


def test_frames_split_into_single_byte_tcp_segments_are_reassembled(server, recorder, raw) -> None:
    sock = raw(server.port)
    data = good_hello(5) + encode_frame(step_batch(1, rows=3)) + encode_frame(heartbeat(42))
    for i in range(len(data)):
        sock.sendall(data[i : i + 1])
    recorder.wait(lambda: len(recorder.messages) == 2, "batch and heartbeat")
    assert recorder.hellos[0].rank == 5
    assert recorder.kinds("heartbeat")[0]["ts_ns"] == 42
    assert decode_tables(recorder.kinds("batch")[0]["tables"])["step_time"][1]["step"].tolist() == [100, 101, 102]


def test_sixteen_ranks_at_once_each_keep_their_identity(server, recorder, make_client) -> None:
    clients = [make_client(server.port, rank=r, world=16) for r in range(16)]

    def run(c: TelemetryClient) -> None:
        for seq in range(20):
            c.send(step_batch(seq, rows=8))
        c.close(drain_timeout_s=5.0)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorder.wait(lambda: len(recorder.closes) == 16, "16 closes")
    assert sorted(c.rank for c in recorder.hellos) == list(range(16))
    per_rank: dict[int, list[int]] = {}
    for conn, msg in recorder.messages:
        per_rank.setdefault(conn.rank, []).append(msg["seq"])
    assert per_rank == {r: list(range(20)) for r in range(16)}  # nothing lost, in order
    assert all(c.dropped_messages == 0 for c in clients)


def test_unknown_kinds_are_skipped(server, recorder, make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="traceml.transport")
    client = make_client(server.port)
    client.send({"kind": "from_a_newer_version", "stuff": [1, 2, 3]})
    client.send(step_batch(1))
    recorder.wait(lambda: len(recorder.messages) == 1, "the batch")
    assert recorder.messages[0][1]["kind"] == "batch"
    assert recorder.hellos[0].skipped == 1
    assert "from_a_newer_version" in caplog.text


def test_handler_exception_does_not_kill_the_server(recorder, make_client) -> None:
    class Flaky(Recorder):
        def on_message(self, conn: Connection, msg: dict[str, Any]) -> None:
            super().on_message(conn, msg)
            if msg["seq"] == 1:
                raise RuntimeError("handler bug")

    handler = Flaky()
    with TelemetryServer(token=TOKEN, handler=handler) as srv:
        client = make_client(srv.port)
        for seq in (1, 2, 3):
            client.send(step_batch(seq))
        handler.wait(lambda: len(handler.messages) == 3, "three batches")
        assert srv.handler_errors == 1
        assert [m["seq"] for _, m in handler.messages] == [1, 2, 3]
        client.close()
    assert handler.closes and handler.closes[0][1] == "eof"


def test_stop_closes_connections_with_reason_stopped(recorder, raw) -> None:
    srv = TelemetryServer(token=TOKEN, handler=recorder).start()
    sock = raw(srv.port)
    sock.sendall(good_hello(1))
    recorder.wait(lambda: len(recorder.hellos) == 1, "hello")
    srv.stop()
    assert recorder.closes == [(recorder.hellos[0], "stopped")]
    assert closed_by_peer(sock)


def test_a_listening_socket_handed_over_is_served_as_is(recorder, make_client) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    client = make_client(port)  # connects before the server starts: the backlog holds it
    with TelemetryServer(token=TOKEN, handler=recorder, sock=listener) as srv:
        assert srv.port == port
        client.send(step_batch(1))
        recorder.wait(lambda: len(recorder.messages) == 1, "a batch through the adopted socket")
        client.close()
    assert listener.fileno() == -1  # the server closed what it adopted


# --- refusals -----------------------------------------------------------------------


def test_wrong_token_is_refused_and_logged_without_the_token(server, recorder, make_client, raw, caplog) -> None:
    caplog.set_level(logging.INFO, logger="traceml.transport")
    good = make_client(server.port, rank=0)
    assert good.send(step_batch(1))
    bad_raw = raw(server.port)
    bad_port = bad_raw.getsockname()[1]
    bad_raw.sendall(encode_frame({**hello("run-1", "guessed-token", identity(1)), "proto": PROTOCOL_VERSION}))
    assert closed_by_peer(bad_raw)
    bad_client = make_client(server.port, rank=2, token="another-guess")
    bad_client.send(step_batch(1))
    wait_until(lambda: server.refused == 2, "two refusals")
    assert good.send(step_batch(2))
    recorder.wait(lambda: len(recorder.messages) == 2, "both good batches")

    assert [c.rank for c in recorder.hellos] == [0]  # refused peers never reach the handler
    assert {m["seq"] for _, m in recorder.messages} == {1, 2}
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any(f"127.0.0.1:{bad_port}" in m and "wrong token" in m for m in refusals)
    assert TOKEN not in caplog.text
    assert "guessed-token" not in caplog.text and "another-guess" not in caplog.text


@pytest.mark.parametrize(
    ("first_frame", "log_match"),
    [
        (good_hello(0, {"proto": 2}), ["version 2", "version 1"]),
        (encode_frame(heartbeat(1)), ["expected a hello"]),
        (good_hello(0, {"rank": "zero"}), ["'rank'"]),
    ],
    ids=["protocol-version", "not-a-hello", "ill-typed-hello"],
)
def test_bad_hellos_are_refused_naming_the_problem(server, recorder, raw, caplog, first_frame, log_match) -> None:
    caplog.set_level(logging.WARNING, logger="traceml.transport")
    sock = raw(server.port)
    sock.sendall(first_frame)
    assert closed_by_peer(sock)
    wait_until(lambda: server.refused == 1, "the refusal")
    assert all(m in caplog.text for m in log_match), caplog.text
    assert not recorder.hellos and not recorder.closes


def test_run_id_mismatch_is_refused(recorder, raw, caplog) -> None:
    with TelemetryServer(token=TOKEN, handler=recorder, run_id="run-2") as srv:
        sock = raw(srv.port)
        sock.sendall(good_hello(0))
        assert closed_by_peer(sock)
        assert "'run-1'" in caplog.text and "'run-2'" in caplog.text
    assert not recorder.hellos


def test_a_silent_connection_is_refused_after_the_hello_deadline(recorder, raw, caplog) -> None:
    with TelemetryServer(token=TOKEN, handler=recorder, hello_timeout_s=0.2) as srv:
        sock = raw(srv.port)
        port = sock.getsockname()[1]
        assert closed_by_peer(sock)
        assert srv.refused == 1
    assert f"127.0.0.1:{port}" in caplog.text and "no hello within 0.2 s" in caplog.text


def test_oversize_prefix_is_refused_before_allocation(server, recorder, raw, caplog) -> None:
    one_gib = struct.pack(">I", 1 << 30)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before_hello = raw(server.port)
        before_hello.sendall(one_gib)  # only the prefix: the server must not wait for the frame
        assert closed_by_peer(before_hello)

        after_hello = raw(server.port)
        after_hello.sendall(good_hello(3) + one_gib)
        assert closed_by_peer(after_hello)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024, f"peak traced memory {peak} bytes: the frame was allocated"
    recorder.wait(lambda: len(recorder.closes) == 1, "on_close of the admitted connection")
    conn, reason = recorder.closes[0]
    assert conn.rank == 3 and reason.startswith("too_large:")
    assert "1073741824" in reason and "16 MiB" in reason and "TRACEML_MAX_FRAME_MB" in reason
    assert "FrameTooLargeError" in caplog.text
    assert server.malformed == 2


def test_configured_frame_limit_applies_and_client_keeps_serving_others(recorder, make_client) -> None:
    with TelemetryServer(token=TOKEN, handler=recorder, max_frame_bytes=2000) as srv:
        big = make_client(srv.port, rank=1)
        small = make_client(srv.port, rank=2)
        big.send(step_batch(1, rows=100))  # ~8 KB: over the server's 2000-byte limit
        recorder.wait(lambda: any(r.startswith("too_large") for _, r in recorder.closes), "too_large close")
        assert small.send(step_batch(2, rows=2))
        recorder.wait(lambda: len(recorder.messages) == 1, "the small batch")
        assert recorder.messages[0][0].rank == 2


def _garbage_cases() -> list[tuple[str, bytes, str]]:
    rnd = random.Random(1234)
    ok_wire = encode_columns(PROCESS, rows_to_columns(PROCESS, [(1, 2.0, 3, 4, 5, 6, 7, 8)]))
    short = {"n": 2, "cols": dict(ok_wire["cols"])}
    return [
        ("random framed bytes", frame(rnd.randbytes(300)), "malformed"),
        ("msgpack list", frame(msgpack.packb([1, 2, 3])), "malformed"),
        ("wrong field type", encode_frame({"kind": "batch", "seq": "1", "tables": {}}), "malformed"),
        ("rows do not match n", encode_frame(batch(1, {"process": short})), "malformed"),
        ("ext type", frame(msgpack.packb({"kind": "heartbeat", "ts_ns": msgpack.ExtType(3, b"x")})), "malformed"),
        ("timestamp ext", frame(msgpack.packb({"kind": "heartbeat", "ts_ns": msgpack.Timestamp(5, 0)})), "malformed"),
        ("huge declared array", frame(b"\xdd\xff\xff\xff\xff"), "malformed"),
        ("huge declared map", frame(b"\x81\xa4kind\xdf\x7f\xff\xff\xff"), "malformed"),
        ("second hello", good_hello(0), "malformed"),
        ("http request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "too_large"),
    ]


def test_garbage_closes_only_that_connection(server, recorder, make_client, raw, caplog) -> None:
    good = make_client(server.port, rank=0)
    cases = _garbage_cases()
    for i, (name, garbage, category) in enumerate(cases, start=1):
        sock = raw(server.port)
        sock.sendall(good_hello(i) + encode_frame(heartbeat(i)) + garbage)
        assert closed_by_peer(sock), name
        recorder.wait(lambda i=i: len(recorder.closes) == i, f"close after {name}")
        conn, reason = recorder.closes[-1]
        assert conn.rank == i and reason.startswith(category + ":"), (name, reason)
        assert good.send(step_batch(i)), name  # the server still serves the good rank
    recorder.wait(lambda: len(recorder.kinds("batch")) == len(cases), "every good batch")
    assert [m["seq"] for m in recorder.kinds("batch")] == list(range(1, len(cases) + 1))
    assert len(recorder.kinds("heartbeat")) == len(cases)  # frames before the garbage were handled
    assert server.malformed == len(cases)
    assert "MalformedFrameError" in caplog.text and "FrameTooLargeError" in caplog.text


# --- client resilience --------------------------------------------------------------


def test_client_reconnects_to_a_restarted_server_and_delivers_its_buffer(make_client) -> None:
    first = Recorder()
    srv = TelemetryServer(token=TOKEN, handler=first).start()
    port = srv.port
    client = make_client(port, rank=4, buffer_messages=50)
    try:
        assert client.send(step_batch(1))
        first.wait(lambda: len(first.messages) == 1, "first batch")
    finally:
        srv.stop()
    for seq in (2, 3, 4):
        assert not client.send(step_batch(seq))  # the server is gone: buffered
    assert client.pending == 3 and not client.connected

    second = Recorder()
    srv2 = TelemetryServer(port=port, token=TOKEN, handler=second).start()
    try:
        wait_until(lambda: client.pending == 0, "the buffer to drain", step=lambda: client.flush(0.1))
        second.wait(lambda: len(second.messages) == 3, "the buffered batches")
        assert [m["seq"] for _, m in second.messages] == [2, 3, 4]
        assert second.hellos[0].identity == identity(4)  # a fresh hello on the new connection
        assert client.connections == 2 and client.dropped_messages == 0
    finally:
        client.close()
        srv2.stop()


def test_bounded_buffer_drops_oldest_and_counts_rows_per_table(make_client) -> None:
    port = free_port()
    client = make_client(port, buffer_messages=10)
    two_tables = {
        "step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, [(1, 2, 0, 3, 4, 5, 6, 7, 8, 9)] * 3)),
        "process": encode_columns(PROCESS, rows_to_columns(PROCESS, [(1, 2.0, 3, 4, 5, 6, 7, 8)])),
    }
    for seq in range(1000):
        assert client.send(batch(seq, two_tables, {"step_time": 5})) is False
    assert client.dropped_messages == 990
    assert client.dropped_rows == {"step_time": 2970, "process": 990}
    assert client.pending == 10

    # when a server appears, the 10 newest are delivered and report every dropped row
    recorder = Recorder()
    with TelemetryServer(port=port, token=TOKEN, handler=recorder):
        wait_until(lambda: client.pending == 0, "the buffer to drain", step=lambda: client.flush(0.1))
        recorder.wait(lambda: len(recorder.messages) == 10, "ten batches")
        assert [m["seq"] for _, m in recorder.messages] == list(range(990, 1000))
        assert recorder.messages[-1][1]["drops"] == {"step_time": 5 + 2970, "process": 990}
        client.close()


def test_unreachable_server_costs_a_bounded_rate_limited_attempt(make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="traceml.transport")
    client = make_client(free_port(), buffer_messages=5)
    results = [client.send(step_batch(i)) for i in range(200)]
    assert results == [False] * 200
    assert client.flush(0.05) is False
    # exponential backoff: a handful of connect attempts, not one per send
    assert 1 <= client.connect_failures <= 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot reach" in r.getMessage()]
    assert len(warnings) == 1  # one warning per outage, the rest at debug
    client.close(drain_timeout_s=0.0)
    assert client.dropped_messages == 200 and client.dropped_rows == {"step_time": 800}
    assert client.send(step_batch(201)) is False  # after close: dropped, never raises
    assert client.dropped_messages == 201


def test_send_never_raises_on_unencodable_or_odd_messages(server, recorder, make_client) -> None:
    client = make_client(server.port, max_frame_bytes=4096)
    assert client.send({"kind": "attachment", "name": "x", "data": {"a": object()}}) is False
    assert client.send({"kind": "attachment", "name": "big", "data": {"b": b"x" * 10_000}}) is False
    assert client.send(None) is False  # type: ignore[arg-type]
    assert client.send(step_batch(1))
    recorder.wait(lambda: len(recorder.messages) == 1, "the good batch")
    assert client.dropped_messages == 2


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="buffer_messages=0"):
        TelemetryClient("127.0.0.1", 1, hello("r", TOKEN, identity()), buffer_messages=0)
    with pytest.raises(ConfigError, match="backoff_min_s"):
        TelemetryClient("127.0.0.1", 1, hello("r", TOKEN, identity()), backoff_min_s=3.0, backoff_max_s=2.0)
    with pytest.raises(ConfigError, match="max_frame_bytes=0"):
        TelemetryServer(token=TOKEN, max_frame_bytes=0)
    with pytest.raises(HandshakeError):
        TelemetryClient("127.0.0.1", 1, {"kind": "hello", "token": TOKEN})


def test_stalled_server_bounds_send_and_close(make_client) -> None:
    # a listener that never accepts: the kernel completes the handshake, nobody reads
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        client = make_client(listener.getsockname()[1], send_timeout_s=0.1, buffer_messages=4)
        blob = b"x" * (4 * 1024 * 1024)
        results = [client.send(attachment(f"blob{i}", {"b": blob})) for i in range(12)]
        assert results[-1] is False and client.connected
        assert client.pending >= 1 and client.dropped_messages >= 1
        client.close(drain_timeout_s=0.1)
        assert client.pending == 0 and not client.connected
    finally:
        listener.close()
