"""The control channel from ``traceml run`` to its aggregator: JSON lines on the aggregator's stdin.

Lines are bounded (:data:`MAX_LINE_BYTES`) and one that does not parse is skipped; end of input without
an ``exit`` line ends the run with an unknown status.  Line kinds: docs/internals.md, "Aggregator".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any

OUTPUT = "output"
EXIT = "exit"
#: longest control line read; longer ones are cut (training output lines can be long)
MAX_LINE_BYTES = 1 << 20


def output_line(stream: str, text: str) -> bytes:
    return (json.dumps({"kind": OUTPUT, "stream": stream, "text": text}, ensure_ascii=False) + "\n").encode()


def exit_line(exit_code: int | None, signal: str = "", duration_s: float = 0.0) -> bytes:
    msg = {"kind": EXIT, "exit_code": exit_code, "signal": signal, "duration_s": round(float(duration_s), 3)}
    return (json.dumps(msg) + "\n").encode()


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """One control message, or None for a line that is not one (skipped by the reader)."""
    try:
        msg = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    if not isinstance(msg, dict) or msg.get("kind") not in (OUTPUT, EXIT):
        return None
    if msg["kind"] == OUTPUT and not (isinstance(msg.get("text"), str) and msg.get("stream") in ("stdout", "stderr")):
        return None
    if msg["kind"] == EXIT:
        code = msg.get("exit_code")
        if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
            return None
        if not isinstance(msg.get("signal", ""), str) or not isinstance(msg.get("duration_s", 0.0), (int, float)):
            return None
    return msg


def read_control(
    stream: IO[bytes], on_output: Callable[[str, str], None], on_exit: Callable[[dict[str, Any] | None], None]
) -> None:
    """Read control lines until end of input; ``on_exit(None)`` when input ends without an exit line."""
    exited = False
    while True:
        try:
            raw = stream.readline(MAX_LINE_BYTES)
        except (OSError, ValueError):
            raw = b""
        if not raw:
            break
        msg = parse_line(raw)
        if msg is None:
            continue
        if msg["kind"] == OUTPUT:
            on_output(msg["stream"], msg["text"])
        elif not exited:
            exited = True
            on_exit(msg)
    if not exited:
        on_exit(None)
