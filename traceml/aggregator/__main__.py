"""``python -m traceml.aggregator``: the aggregator process of one run (started by ``traceml run``).

The token comes from ``TRACEML_TOKEN``, never the command line.  Light imports: no torch, no dash unless
``--ui web``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence

from traceml.config import DEFAULT_MAX_FRAME_BYTES, ENV_MAX_FRAME_MB, ENV_TOKEN
from traceml.errors import TracemlError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m traceml.aggregator", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: a free one, printed)")
    p.add_argument(
        "--listen-fd", type=int, default=None, help="serve on this inherited listening socket instead of binding"
    )
    p.add_argument("--run-id", default="", help="refuse ranks of another run id")
    p.add_argument("--run-name", default="")
    p.add_argument("--out", default=None, help="recording path (.tml); omit for a live-only run")
    p.add_argument("--ui", choices=("terminal", "web", "none"), default="none")
    p.add_argument("--web-port", type=int, default=8050)
    p.add_argument("--expected-ranks", type=int, default=1, help="world size of the run")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--capacity", type=int, default=200_000, help="live rows kept per rank and table")
    p.add_argument("--finish-timeout", type=float, default=10.0, help="seconds to wait for ranks after the exit")
    p.add_argument("--max-frame-mb", type=float, default=None, help=f"frame limit (default {ENV_MAX_FRAME_MB} or 16)")
    p.add_argument("--start-ns", type=int, default=0, help="when the run started (time.time_ns())")
    p.add_argument("--control-stdin", action="store_true", help="read the control channel on stdin")
    p.add_argument("--otlp", default=None, help="send the run's metrics to this OTLP/HTTP endpoint ('' : OTEL_* vars)")
    p.add_argument("--otlp-interval", type=float, default=15.0, help="seconds between OTLP pushes (default 15)")
    p.add_argument("--command", nargs=argparse.REMAINDER, default=[], help="the training command, for the record")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from traceml.aggregator.service import Aggregator, AggregatorOptions

    max_frame_mb = args.max_frame_mb
    if max_frame_mb is None:
        raw = os.environ.get(ENV_MAX_FRAME_MB, "")
        max_frame_mb = float(raw) if raw else DEFAULT_MAX_FRAME_BYTES / (1024 * 1024)
    opts = AggregatorOptions(
        host=args.host,
        port=args.port,
        token=os.environ.get(ENV_TOKEN, ""),
        run_id=args.run_id,
        run_name=args.run_name,
        out=args.out,
        ui=args.ui,
        web_port=args.web_port,
        expected_ranks=args.expected_ranks,
        nnodes=args.nnodes,
        capacity=args.capacity,
        finish_timeout_s=args.finish_timeout,
        max_frame_bytes=int(max_frame_mb * 1024 * 1024),
        command=list(args.command),
        otlp_endpoint=args.otlp,
        otlp_interval_s=args.otlp_interval,
    )
    if args.start_ns:
        opts.start_ns = args.start_ns
    if args.listen_fd is not None:
        try:
            opts.listen_sock = socket.socket(fileno=args.listen_fd)
        except OSError as exc:
            print(f"traceml aggregator: --listen-fd {args.listen_fd} is not a socket ({exc})", file=sys.stderr)
            return 2
    try:
        agg = Aggregator(opts)
    except TracemlError as exc:
        print(f"traceml aggregator: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: agg.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agg.request_stop())

    def announce() -> None:
        if not args.control_stdin:
            print(f"traceml aggregator: listening on {args.host}:{agg.server.port}", file=sys.stderr, flush=True)

    try:
        agg.run(sys.stdin.buffer if args.control_stdin else None, on_started=announce)
    except TracemlError as exc:
        print(f"traceml aggregator: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The recording is closed and the summary printed: skip the interpreter's teardown (freeing
    # the live store, joining daemon threads), which only delays `traceml run`'s own exit.
    os._exit(code)
