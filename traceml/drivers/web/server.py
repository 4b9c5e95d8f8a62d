"""Serving a Dash app: :class:`WebServer` (threaded WSGI, 127.0.0.1 unless told otherwise, ``Host``
checked against DNS rebinding), :func:`listen`, and :func:`serve_app`, the one serving loop that
``traceml run --ui web`` (:func:`serve`, :func:`serve_live`) and ``traceml replay --ui web`` share."""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import dash
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from traceml.drivers.web.app import build_app
from traceml.drivers.web.context import Source
from traceml.drivers.web.layout import DEFAULT_PORT, DEFAULT_REFRESH_S
from traceml.errors import ConfigError
from traceml.transport import listening_socket

#: seconds a connection may stay silent before the server drops it
IDLE_CONNECTION_S = 2.0


class _QuietHandler(WSGIRequestHandler):
    """No access log; one request per connection, so no handler thread waits on an idle browser
    connection after the server stopped (the dashboard talks to 127.0.0.1: reconnecting is cheap)."""

    protocol_version = "HTTP/1.0"
    #: seconds a connection may stay silent (a browser's speculative preconnect never sends a request:
    #: without a timeout its thread would wait on it forever, past stop())
    timeout = IDLE_CONNECTION_S

    def handle(self) -> None:
        # note the thread answering, so stop() can wait for requests still building a chart
        active: set[threading.Thread] | None = getattr(self.server, "traceml_active", None)
        me = threading.current_thread()
        if active is not None:
            active.add(me)
        try:
            super().handle()
        finally:
            if active is not None:
                active.discard(me)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: names a browser on this machine uses for a loopback server (IP literals are checked apart)
LOOPBACK_NAMES = frozenset({"localhost"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_FORBIDDEN_BODY = (
    b"403 Forbidden: this traceml dashboard answers only requests addressed to it by a loopback name\n"
    b"(127.0.0.1, localhost, [::1]) or by the address it was started with (--host).\n"
)


def _host_of(header: str) -> str:
    """The host name of a ``Host`` header, without the port, brackets or a final dot, lower-case."""
    host = header.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".").lower()


def _machine_names() -> set[str]:
    """Every address of this machine's interfaces, and its host name (for a wildcard bind)."""
    names = {socket.gethostname().lower()}
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            names.update(
                a.address.split("%")[0].lower() for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)
            )
    except Exception:
        pass
    return names


def allowed_hosts(host: str, bound: str) -> frozenset[str]:
    """The ``Host`` names a dashboard bound to ``bound`` (asked as ``host``) answers (DNS rebinding).

    Loopback names always; the name or address it was started with; for a wildcard bind
    (``0.0.0.0``, ``::``) also this machine's addresses and host name.  Any other name, the kind
    a rebinding attacker's domain has, gets 403.
    """
    names = set(LOOPBACK_NAMES) | {_host_of(host), _host_of(f"[{bound}]" if ":" in bound else bound)}
    if host in _WILDCARDS or bound in _WILDCARDS:
        names |= _machine_names()
    return frozenset(n for n in names if n and n not in _WILDCARDS)


class HostCheck:
    """WSGI middleware: a request whose ``Host`` is not an allowed name gets 403 (DNS rebinding)."""

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    def permits(self, header: str) -> bool:
        name = _host_of(header)
        if name in self.allowed:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not self.permits(str(environ.get("HTTP_HOST", ""))):
            start_response(
                "403 Forbidden",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(_FORBIDDEN_BODY)))],
            )
            return [_FORBIDDEN_BODY]
        return self.app(environ, start_response)


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on ``host:port``; a busy or bad address is a ConfigError that says what to change.

    Bind before loading anything heavy, then hand the socket to :class:`WebServer`.
    """
    try:
        return listening_socket(host, port)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}; "
            "choose another --port (0 picks a free one) or --host"
        ) from exc


class WebServer:
    """A threaded WSGI server for a Dash app; ``port=0`` picks a free port.  ``stop()`` joins everything.

    ``sock`` is a socket from :func:`listen` (the server takes it over); without it the server binds
    ``host:port`` itself.  Requests are answered only when their ``Host`` names this server by a
    loopback name or by ``host`` (:func:`allowed_hosts`); others get 403.
    """

    def __init__(
        self, app: dash.Dash, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> None:
        # bind ourselves so a busy port is an error we can word (werkzeug would print and sys.exit)
        sock = sock if sock is not None else listen(host, port)
        try:
            bound_host = sock.getsockname()[0]
            guarded = HostCheck(app.server, allowed_hosts(host, str(bound_host)))
            self._server: BaseWSGIServer = make_server(
                bound_host, 0, guarded, threaded=True, request_handler=_QuietHandler, fd=sock.fileno()
            )
        finally:
            sock.close()  # the server holds its own duplicate of the descriptor
        self._active: set[threading.Thread] = set()
        self._server.traceml_active = self._active  # type: ignore[attr-defined]
        self.host = str(bound_host)
        self.port: int = int(self._server.port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> WebServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="traceml-web", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (from another thread) or Ctrl-C."""
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._server.server_close()

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop accepting, then wait (at most ``wait_s``) for requests still being answered."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        deadline = time.monotonic() + wait_s
        for thread in list(self._active):
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_app(
    app: dash.Dash,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    sock: socket.socket | None = None,
    stop: threading.Event | None = None,
    announce: Callable[[str], None] | None = None,
    what: str = "traceml dashboard",
) -> None:
    """Serve ``app`` until Ctrl-C (or until ``stop`` is set), saying where (``announce``, default
    stderr) and warning when ``host`` is not a loopback address.  ``sock``: see :class:`WebServer`."""
    say = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))
    server = WebServer(app, host, port, sock=sock)
    if not is_loopback(host):
        say(f"warning: the dashboard has no authentication and is reachable on {host}:{server.port}")
    say(f"{what}: {server.url}  (Ctrl-C to stop)")
    if stop is None:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return
    server.start()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def serve(
    source: Source,
    *,
    live: bool,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    compare_source: Source | None = None,
    title: str | None = None,
    refresh_s: float = DEFAULT_REFRESH_S,
    stop: threading.Event | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Build the app and serve it until Ctrl-C (or ``stop`` is set).  Binds 127.0.0.1 unless ``host`` says otherwise."""
    app = build_app(source, live=live, compare_source=compare_source, title=title, refresh_s=refresh_s)
    serve_app(app, host=host, port=port, stop=stop, announce=announce)


def serve_live(
    snapshot: Source, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, refresh_s: float = DEFAULT_REFRESH_S
) -> WebServer:
    """Start the live dashboard over ``snapshot`` (``ColumnStore.snapshot``) in a thread; ``.stop()`` ends it."""
    app = build_app(snapshot, live=True, refresh_s=refresh_s)
    return WebServer(app, host, port).start()
