"""The rank's end of the wire: a TCP client that never costs training more than a bounded wait.

Driven by ONE thread; drops (and counts) the oldest messages when the buffer is full, and never raises from
``send``, ``flush`` or ``close``.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from traceml.config import DEFAULT_MAX_FRAME_BYTES
from traceml.errors import ConfigError
from traceml.transport.framing import encode_frame
from traceml.transport.messages import BATCH, RANK_FINISHED, batch_rows, parse_hello

log = logging.getLogger("traceml.transport")


class _Item:
    """One message waiting for the socket; encoded when it is about to be written."""

    __slots__ = ("msg", "frame", "rows", "kind", "done")

    def __init__(self, msg: dict[str, Any] | None, frame: bytes | None, rows: dict[str, int], kind: str) -> None:
        self.msg = msg
        self.frame = frame
        self.rows = rows
        self.kind = kind
        self.done = False


def _wait_writable(sock: socket.socket, timeout_s: float) -> bool:
    if timeout_s <= 0:
        return False
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        return bool(poller.poll(timeout_s * 1000.0))
    _, writable, _ = select.select([], [sock], [], timeout_s)  # pragma: no cover - Windows
    return bool(writable)


class TelemetryClient:
    """Sends messages to a :class:`~traceml.transport.server.TelemetryServer`.

    ``hello`` is the map from :func:`traceml.transport.messages.hello`; it is sent first on
    every (re)connection.  With ``merge_drops`` (default) the client adds the rows it dropped
    itself to the ``drops`` of every batch and rank_finished it sends, so the aggregator sees
    every lost row: the caller reports only its own losses (e.g. ``BoundedTable.lost``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        hello: Mapping[str, Any],
        *,
        connect_timeout_s: float = 0.5,
        send_timeout_s: float = 1.0,
        buffer_messages: int = 256,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 2.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        merge_drops: bool = True,
    ) -> None:
        if buffer_messages < 1:
            raise ConfigError(f"buffer_messages={buffer_messages}: expected at least 1 message")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ConfigError(
                f"backoff_min_s={backoff_min_s}, backoff_max_s={backoff_max_s}: expected 0 < backoff_min_s <= backoff_max_s"
            )
        self.host = host
        self.port = int(port)
        #: who this client says it is (HandshakeError here for an ill-formed hello: a bug in the caller)
        self.identity = parse_hello(dict(hello)).identity
        self._hello_frame = encode_frame(hello, max_frame_bytes)
        self.connect_timeout_s = connect_timeout_s
        self.send_timeout_s = send_timeout_s
        self.buffer_messages = buffer_messages
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.max_frame_bytes = max_frame_bytes
        self.merge_drops = merge_drops

        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._addrs: list[tuple[Any, ...]] | None = None
        self._queue: deque[_Item] = deque()
        self._inflight: _Item | None = None
        self._offset = 0
        self._next_attempt = 0.0
        self._backoff = backoff_min_s
        self._connected_at = 0.0
        self._stable = False
        self._outage = False
        self._dropped_in_outage = 0
        self._closed = False

        #: messages dropped (buffer full while disconnected, unencodable, or sent after close)
        self.dropped_messages = 0
        #: rows in dropped batches, per table
        self.dropped_rows: dict[str, int] = {}
        #: messages written to the socket in full (hellos not counted)
        self.sent_messages = 0
        self.sent_bytes = 0
        #: successful connections so far (each one started with a hello)
        self.connections = 0
        self.connect_failures = 0

    # --- public -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def pending(self) -> int:
        """Messages buffered or partly written."""
        return len(self._queue) + (1 if self._inflight is not None and self._inflight.kind != "hello" else 0)

    def send(self, msg: Mapping[str, Any]) -> bool:
        """Queue ``msg`` and write what the socket takes within ``send_timeout_s``.

        True when ``msg`` (and everything queued before it) has been handed to the kernel; False
        when it is still buffered or was dropped.  Never raises.
        """
        try:
            with self._lock:
                if self._closed:
                    log.debug("telemetry client is closed; dropping a %s message", msg.get("kind"))
                    self.dropped_messages += 1
                    self._count_drop_rows(batch_rows(msg))
                    return False
                item = _Item(dict(msg), None, batch_rows(msg), str(msg.get("kind")))
                self._enqueue(item)
                self._pump(time.monotonic() + self.send_timeout_s)
                return item.done
        except Exception:  # fail-open: telemetry must never break training
            log.exception("unexpected error in the telemetry client; message kept or dropped, training goes on")
            return False

    def flush(self, timeout_s: float | None = None) -> bool:
        """Try to (re)connect and write the buffer for up to ``timeout_s`` (default ``send_timeout_s``).
        True when nothing is left buffered.  Never raises."""
        try:
            with self._lock:
                if not self._closed:
                    self._pump(time.monotonic() + (self.send_timeout_s if timeout_s is None else timeout_s))
                return self.pending == 0
        except Exception:
            log.exception("unexpected error in the telemetry client while flushing")
            return False

    def close(self, drain_timeout_s: float = 2.0) -> None:
        """Drain the buffer for at most ``drain_timeout_s`` (connecting if need be), then close.
        Messages still buffered are counted as dropped.  Idempotent; never raises."""
        try:
            with self._lock:
                if self._closed:
                    return
                deadline = time.monotonic() + drain_timeout_s
                while self.pending and time.monotonic() < deadline:
                    self._pump(deadline)
                    if self.pending and self._sock is None:
                        time.sleep(max(0.0, min(self._next_attempt, deadline) - time.monotonic()) or 0.005)
                left = list(self._queue)
                if self._inflight is not None and self._inflight.kind != "hello":
                    left.append(self._inflight)
                for item in left:
                    self._count_drop(item)
                if left:
                    log.warning(
                        "telemetry client closed with %d message(s) unsent after %.1f s (aggregator at %s:%d); "
                        "counted as dropped",
                        len(left),
                        drain_timeout_s,
                        self.host,
                        self.port,
                    )
                self._queue.clear()
                self._inflight = None
                self._closed = True
                self._disconnect()
        except Exception:
            log.exception("unexpected error while closing the telemetry client")

    def __enter__(self) -> TelemetryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- buffer -------------------------------------------------------------------------

    def _encode(self, item: _Item) -> bool:
        """Encode ``item`` right before its first byte is written, so that the drops merged
        into it are the ones counted up to that moment.  False (and counted as dropped) when it
        cannot be encoded."""
        msg = item.msg
        assert msg is not None
        if self.merge_drops and item.kind in (BATCH, RANK_FINISHED) and self.dropped_rows:
            drops = dict(msg.get("drops") or {})
            for table, lost in self.dropped_rows.items():
                drops[table] = int(drops.get(table, 0)) + lost
            msg = {**msg, "drops": drops}
        try:
            item.frame = encode_frame(msg, self.max_frame_bytes)
        except Exception as exc:
            log.warning("dropping a %s message that cannot be sent: %s", item.kind, exc)
            self._count_drop(item)
            return False
        return True

    def _enqueue(self, item: _Item) -> None:
        self._queue.append(item)
        while self.pending > self.buffer_messages:
            self._count_drop(self._queue.popleft())
            self._dropped_in_outage += 1
            if self._dropped_in_outage == 1:
                log.warning(
                    "telemetry buffer full (%d messages): the aggregator at %s:%d is unreachable or slow; "
                    "dropping the oldest messages (counted in the run's drops)",
                    self.buffer_messages,
                    self.host,
                    self.port,
                )

    def _count_drop(self, item: _Item) -> None:
        self.dropped_messages += 1
        self._count_drop_rows(item.rows)

    def _count_drop_rows(self, rows: Mapping[str, int]) -> None:
        for table, n in rows.items():
            self.dropped_rows[table] = self.dropped_rows.get(table, 0) + n

    # --- socket -------------------------------------------------------------------------

    def _pump(self, deadline: float) -> None:
        """Connect if due, then write hello + buffered frames until done or ``deadline``."""
        if self._sock is not None:
            self._check_stable()
            self._check_peer_closed()
        while True:
            sock = self._sock
            if sock is None:
                if not self.pending or not self._connect(deadline):
                    return
                continue
            if self._inflight is None:
                if not self._queue:
                    return
                item = self._queue.popleft()
                if not self._encode(item):
                    continue
                self._inflight = item
                self._offset = 0
            item = self._inflight
            assert item.frame is not None
            try:
                n = sock.send(memoryview(item.frame)[self._offset :])
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._lost(f"{type(exc).__name__}: {exc}")
                continue
            if n:
                self._offset += n
                if self._offset == len(item.frame):
                    item.done = True
                    self._inflight = None
                    if item.kind != "hello":
                        self.sent_messages += 1
                        self.sent_bytes += len(item.frame)
                if time.monotonic() >= deadline:
                    return
                continue
            if not _wait_writable(sock, deadline - time.monotonic()):
                return

    def _check_peer_closed(self) -> None:
        """Notice a server that closed the connection (restart, refusal) before writing into it."""
        assert self._sock is not None
        try:
            data = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
            return
        if not data:
            self._lost("closed by the aggregator")
        # the v1 server sends nothing; bytes from a newer one are read and ignored

    def _connect(self, deadline: float) -> bool:
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        timeout = max(0.05, min(self.connect_timeout_s, deadline - now))
        error = "no address"
        try:
            if self._addrs is None:
                self._addrs = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            for family, type_, proto, _, addr in self._addrs:
                sock = socket.socket(family, type_, proto)
                try:
                    sock.settimeout(timeout)
                    sock.connect(addr)
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError as exc:
                    sock.close()
                    error = f"{type(exc).__name__}: {exc}"
                    continue
                self._on_connected(sock)
                return True
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.connect_failures += 1
        self._schedule_retry()
        self._outage_log(
            "cannot reach the traceml aggregator at %s:%d (%s); buffering up to %d messages and retrying "
            "every %.1f-%.1f s",
            self.host,
            self.port,
            error,
            self.buffer_messages,
            self.backoff_min_s,
            self.backoff_max_s,
        )
        return False

    def _on_connected(self, sock: socket.socket) -> None:
        self._sock = sock
        self._connected_at = time.monotonic()
        self._stable = False
        self.connections += 1
        log.debug(
            "connected to the traceml aggregator at %s:%d (connection %d)", self.host, self.port, self.connections
        )
        # the hello goes first; a data frame cut by the last connection's loss is already re-queued
        self._inflight = _Item(None, self._hello_frame, {}, "hello")
        self._offset = 0

    def _check_stable(self) -> None:
        """A connection that has lived ``backoff_max_s`` ends the outage and resets the backoff.
        (One that the server closes at once, e.g. a refused token, keeps backing off.)"""
        if self._stable or time.monotonic() - self._connected_at < self.backoff_max_s:
            return
        self._stable = True
        self._backoff = self.backoff_min_s
        if self._outage:
            log.info(
                "connection to the traceml aggregator at %s:%d restored; %d message(s) dropped meanwhile",
                self.host,
                self.port,
                self._dropped_in_outage,
            )
        self._outage = False
        self._dropped_in_outage = 0

    def _lost(self, reason: str) -> None:
        item = self._inflight
        if item is not None and item.kind != "hello":
            item.frame = None  # re-encoded and re-sent whole on the next connection
            self._queue.appendleft(item)
        self._inflight = None
        self._offset = 0
        self._disconnect()
        self._check_stable_at_loss()
        self._schedule_retry()
        self._outage_log(
            "lost the connection to the traceml aggregator at %s:%d (%s); reconnecting with backoff",
            self.host,
            self.port,
            reason,
        )

    def _check_stable_at_loss(self) -> None:
        if time.monotonic() - self._connected_at >= self.backoff_max_s:
            self._stable = False
            self._backoff = self.backoff_min_s
            self._outage = False
            self._dropped_in_outage = 0

    def _outage_log(self, fmt: str, *args: Any) -> None:
        """One warning per outage: a server that keeps refusing us must not flood the rank's log."""
        log.log(logging.DEBUG if self._outage else logging.WARNING, fmt, *args)
        self._outage = True

    def _schedule_retry(self) -> None:
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.backoff_max_s)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
