"""The aggregator's end of the wire: one selector thread serving every rank's connection, a hello
with this run's token before anything else, every message validated before the handler sees it.
A bad peer loses its own connection, never the server (docs/internals.md, "Transport").
"""

from __future__ import annotations

import hmac
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from traceml.config import DEFAULT_MAX_FRAME_BYTES, max_objects_per_kib_from_env
from traceml.errors import ConfigError, FrameTooLargeError, HandshakeError, MalformedFrameError, TransportError
from traceml.transport.framing import HEADER_SIZE, FrameDecoder
from traceml.transport.identity import RankIdentity
from traceml.transport.messages import HELLO, KINDS, PROTOCOL_VERSION, parse_hello, validate_message

log = logging.getLogger("traceml.transport")

#: ``on_close`` reasons start with one of these words (then ``": detail"`` where there is one)
CLOSE_EOF = "eof"  # the rank closed its end (normal exit, or a crash: the OS closes its sockets)
CLOSE_ERROR = "error"  # socket error, e.g. connection reset
CLOSE_MALFORMED = "malformed"  # the rank sent a frame that is not a valid message
CLOSE_TOO_LARGE = "too_large"  # a frame over the frame limit
CLOSE_STOPPED = "stopped"  # the server stopped

#: hellos are small: until one is accepted a peer may not send frames larger than this
HELLO_MAX_BYTES = 64 * 1024
RECV_BYTES = 256 * 1024


@dataclass(eq=False)
class Connection:
    """One rank's connection as the handler sees it; counters are updated by the I/O thread."""

    id: int
    peer: str
    accepted_ns: int
    identity: RankIdentity | None = None
    run_id: str = ""
    last_seen_ns: int = 0
    bytes_received: int = 0
    frames: int = 0
    messages: int = 0
    skipped: int = 0

    @property
    def rank(self) -> int:
        return self.identity.rank if self.identity is not None else -1

    @property
    def known_rank(self) -> int | None:
        """The rank its hello gave; None before the hello."""
        return self.identity.rank if self.identity is not None else None

    def describe(self) -> str:
        if self.identity is None:
            return f"connection from {self.peer}"
        i = self.identity
        return f"rank {i.rank} ({i.host} pid {i.pid}) at {self.peer}"


#: the name the brief and older notes use for the same type
ConnInfo = Connection


class ServerHandler(Protocol):
    """What the server calls, always on its I/O thread (keep it quick: enqueue, don't block).

    ``on_hello`` once a connection's hello was accepted; ``on_message`` for every later message
    of a known kind (validated); ``on_close`` once for every connection that got ``on_hello``.
    """

    def on_hello(self, conn: Connection) -> None: ...

    def on_message(self, conn: Connection, msg: dict[str, Any]) -> None: ...

    def on_close(self, conn: Connection, reason: str) -> None: ...


class BaseHandler:
    """A handler that ignores everything; subclass it and override what you need."""

    def on_hello(self, conn: Connection) -> None:
        pass

    def on_message(self, conn: Connection, msg: dict[str, Any]) -> None:
        pass

    def on_close(self, conn: Connection, reason: str) -> None:
        pass


class _Peer:
    __slots__ = ("sock", "conn", "decoder", "hello_deadline", "open")

    def __init__(self, sock: socket.socket, conn: Connection, decoder: FrameDecoder, hello_deadline: float) -> None:
        self.sock = sock
        self.conn = conn
        self.decoder = decoder
        self.hello_deadline = hello_deadline
        self.open = True


_LISTENER = object()
_WAKE = object()


def listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port) and listening; raises the OSError.

    Bind first, then tell others the port (or hand the socket to another process): a port picked
    as free cannot be taken in between.  Callers word the error for their own option names."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class TelemetryServer:
    """Serves the ranks of one run; ``start()`` binds and starts the I/O thread, ``stop()`` joins it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = "",
        handler: ServerHandler | None = None,
        *,
        run_id: str | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        hello_timeout_s: float = 5.0,
        max_buffered_bytes: int | None = None,
        max_connections: int = 1024,
        name: str = "traceml-transport-server",
        sock: socket.socket | None = None,
        max_objects_per_kib: int | None = None,
    ) -> None:
        if max_frame_bytes < 1 or hello_timeout_s <= 0 or max_connections < 1:
            raise ConfigError(
                f"max_frame_bytes={max_frame_bytes}, hello_timeout_s={hello_timeout_s}, max_connections={max_connections}: "
                "expected a frame limit >= 1 byte, a positive hello timeout and at least 1 connection"
            )
        self.host = host
        self._requested_port = int(port)
        self._token = token.encode("utf-8")
        self.handler: ServerHandler = handler if handler is not None else BaseHandler()
        self.run_id = run_id
        self.max_frame_bytes = max_frame_bytes
        #: a frame's decode budget (objects per KiB); None: TRACEML_MAX_OBJECTS_PER_KIB or 64
        self.max_objects_per_kib = (
            max_objects_per_kib_from_env() if max_objects_per_kib is None else max_objects_per_kib
        )
        self.hello_timeout_s = hello_timeout_s
        #: bytes a connection may hold undecoded: one partial frame plus one read
        self.max_buffered_bytes = (
            max_buffered_bytes if max_buffered_bytes is not None else max_frame_bytes + HEADER_SIZE + RECV_BYTES
        )
        self.max_connections = max_connections
        self.name = name

        self._lock = threading.Lock()
        self._peers: dict[int, _Peer] = {}
        self._next_id = 0
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._port = 0
        #: a socket already bound and listening (handed over by a parent process): no bind, no race
        self._adopt = sock

        #: connections accepted at the TCP level / admitted by a hello / refused / closed as malformed
        self.accepted = 0
        self.admitted = 0
        self.refused = 0
        self.malformed = 0
        self.handler_errors = 0

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the free one picked for port 0); 0 before :meth:`start`."""
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self._port

    def start(self) -> TelemetryServer:
        if self._thread is not None:
            raise TransportError("TelemetryServer.start() called twice; create a new server instead")
        adopted, self._adopt = self._adopt, None
        if adopted is not None:
            listener = adopted
        else:
            try:
                infos = socket.getaddrinfo(
                    self.host, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
                family, type_, proto, _, addr = infos[0]
                listener = socket.socket(family, type_, proto)
            except OSError as exc:
                raise TransportError(
                    f"cannot listen on {self.host}:{self._requested_port} ({exc}); expected a local address such as 127.0.0.1"
                ) from exc
        try:
            if adopted is None:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(addr)
                listener.listen(128)
            listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._sel = selectors.DefaultSelector()
            self._sel.register(listener, selectors.EVENT_READ, _LISTENER)
            self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        except OSError as exc:
            listener.close()
            self._close_plumbing()
            raise TransportError(
                f"cannot listen on {self.host}:{self._requested_port} ({exc}); "
                "choose another port, or port 0 for a free one"
            ) from exc
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        log.debug("telemetry server listening on %s:%d", self.host, self._port)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close every connection (``on_close(conn, "stopped")``), the listener, and join the thread."""
        self._stopping = True
        thread = self._thread
        if thread is None:
            return
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        if thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("telemetry server thread did not stop within %.1f s", timeout_s)

    def __enter__(self) -> TelemetryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connections(self) -> list[Connection]:
        """Admitted connections (hello accepted), oldest first."""
        with self._lock:
            return [p.conn for p in self._peers.values() if p.conn.identity is not None]

    @property
    def pending_connections(self) -> int:
        """Connections still waiting for their hello."""
        with self._lock:
            return sum(1 for p in self._peers.values() if p.conn.identity is None)

    # --- I/O thread ---------------------------------------------------------------------

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stopping:
                for key, _ in sel.select(self._select_timeout()):
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKE:
                        self._drain_wake()
                    else:
                        self._read_guarded(key.data)
                self._expire_hellos()
        except Exception:
            log.exception("telemetry server I/O loop failed; closing every connection")
        finally:
            for peer in list(self._peers.values()):
                self._close(peer, CLOSE_STOPPED)
            if self._listener is not None:
                self._listener.close()
            self._close_plumbing()
            log.debug("telemetry server on %s:%d stopped", self.host, self._port)

    def _close_plumbing(self) -> None:
        if self._sel is not None:
            self._sel.close()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()

    def _select_timeout(self) -> float | None:
        deadlines = [p.hello_deadline for p in self._peers.values() if p.conn.identity is None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: leave the rest in the backlog
                log.warning("telemetry server could not accept a connection: %s", exc)
                return
            peer_name = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            self.accepted += 1
            if len(self._peers) >= self.max_connections:
                self.refused += 1
                log.warning(
                    "refused connection from %s: already serving %d connections (max_connections)",
                    peer_name,
                    len(self._peers),
                )
                sock.close()
                continue
            sock.setblocking(False)
            self._next_id += 1
            conn = Connection(id=self._next_id, peer=peer_name, accepted_ns=time.time_ns())
            decoder = FrameDecoder(min(HELLO_MAX_BYTES, self.max_frame_bytes), self.max_objects_per_kib)
            peer = _Peer(sock, conn, decoder, time.monotonic() + self.hello_timeout_s)
            with self._lock:
                self._peers[conn.id] = peer
            self._sel.register(sock, selectors.EVENT_READ, peer)

    def _read_guarded(self, peer: _Peer) -> None:
        try:
            self._read(peer)
        except Exception as exc:  # a bug must cost one connection, not the server
            log.exception("internal error while serving %s; closing it", peer.conn.describe())
            self._close(peer, f"{CLOSE_ERROR}: internal error {type(exc).__name__}: {exc}")

    def _read(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(peer, f"{CLOSE_ERROR}: {exc}")
            return
        if not data:
            self._close(peer, CLOSE_EOF)
            return
        conn = peer.conn
        conn.bytes_received += len(data)
        try:
            for msg in peer.decoder.iter_feed(data):
                conn.frames += 1
                conn.last_seen_ns = time.time_ns()
                self._dispatch(peer, msg)
                if not peer.open:
                    return
        except FrameTooLargeError as exc:
            self._bad_frame(peer, CLOSE_TOO_LARGE, exc.from_rank(peer.conn.known_rank))
            return
        except MalformedFrameError as exc:
            self._bad_frame(peer, CLOSE_MALFORMED, exc)
            return
        if peer.decoder.buffered > self.max_buffered_bytes:
            self._bad_frame(
                peer,
                CLOSE_TOO_LARGE,
                FrameTooLargeError(
                    peer.decoder.buffered,
                    self.max_buffered_bytes,
                    setting="max_buffered_bytes",
                    rank=peer.conn.known_rank,
                    buffered=True,
                ),
            )

    def _bad_frame(self, peer: _Peer, category: str, exc: TransportError) -> None:
        self.malformed += 1
        log.error("closing %s: %s: %s", peer.conn.describe(), type(exc).__name__, exc)
        self._close(peer, f"{category}: {exc}")

    def _dispatch(self, peer: _Peer, msg: dict[str, Any]) -> None:
        conn = peer.conn
        if conn.identity is None:
            self._handshake(peer, msg)
            return
        kind = msg["kind"]
        if kind not in KINDS:
            conn.skipped += 1
            log.debug("skipping a message of unknown kind %r from %s", kind[:60], conn.describe())
            return
        if kind == HELLO:
            raise MalformedFrameError("a second hello on an admitted connection; expected one hello per connection")
        validate_message(msg)
        conn.messages += 1
        self._call("on_message", conn, msg)

    def _handshake(self, peer: _Peer, msg: dict[str, Any]) -> None:
        try:
            hello = parse_hello(msg)
            if hello.proto != PROTOCOL_VERSION:
                raise HandshakeError(
                    f"rank speaks protocol version {hello.proto}, this aggregator speaks version {PROTOCOL_VERSION}; "
                    "run the ranks and the aggregator from the same traceml install"
                )
            # the token is compared in constant time and never logged, neither ours nor theirs
            if not hmac.compare_digest(hello.token.encode("utf-8"), self._token):
                raise HandshakeError(
                    f"hello for rank {hello.identity.rank} carries a wrong token for this run; "
                    "ranks must be started by this run's `traceml run` (TRACEML_TOKEN)"
                )
            if self.run_id is not None and hello.run_id != self.run_id:
                raise HandshakeError(
                    f"hello for rank {hello.identity.rank} is for run {hello.run_id!r:.80}, this aggregator records "
                    f"run {self.run_id!r}; check TRACEML_RUN_ID"
                )
        except HandshakeError as exc:
            self._refuse(peer, str(exc))
            return
        conn = peer.conn
        conn.identity = hello.identity
        conn.run_id = hello.run_id
        peer.decoder.max_frame_bytes = self.max_frame_bytes
        self.admitted += 1
        log.info("%s connected (world size %d)", conn.describe(), hello.identity.world_size)
        self._call("on_hello", conn)

    def _refuse(self, peer: _Peer, reason: str) -> None:
        self.refused += 1
        log.warning("refused connection from %s: %s", peer.conn.peer, reason)
        self._close(peer, f"refused: {reason}")

    def _expire_hellos(self) -> None:
        now = time.monotonic()
        for peer in [p for p in self._peers.values() if p.conn.identity is None and p.hello_deadline <= now]:
            self._refuse(peer, f"no hello within {self.hello_timeout_s:.1f} s of connecting")

    def _close(self, peer: _Peer, reason: str) -> None:
        if not peer.open:
            return
        peer.open = False
        with self._lock:
            self._peers.pop(peer.conn.id, None)
        if self._sel is not None:
            try:
                self._sel.unregister(peer.sock)
            except (KeyError, ValueError, OSError):
                pass
        try:
            peer.sock.close()
        except OSError:
            pass
        if peer.conn.identity is not None:
            if reason != CLOSE_STOPPED:
                log.info("%s closed (%s)", peer.conn.describe(), reason)
            self._call("on_close", peer.conn, reason)

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.handler, method)(*args)
        except Exception:
            self.handler_errors += 1
            log.exception("telemetry handler %s raised; the server goes on", method)
