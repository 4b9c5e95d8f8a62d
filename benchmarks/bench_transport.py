"""Transport throughput: columnar batches against a one-msgpack-dict-per-row baseline, same run.

    .venv/bin/python benchmarks/bench_transport.py [--rows 131072] [--repeat 3]

For 64, 256 and 1024 step_time rows per batch it measures, for both encodings:

* client send: tuple rows (what ``BoundedTable.take_unsent`` returns) -> message -> bytes handed
  to the kernel by ``TelemetryClient.send``, in rows/s;
* end to end: first send until a server in another process has framed and msgpack-decoded
  every frame (a marker heartbeat after the data comes back through a pipe), in rows/s;
* server decode: ``FrameDecoder`` over the recorded byte stream until every row is in numpy
  columns (``decode_tables`` for columnar; per-row dicts -> arrays for the baseline), in rows/s;
* wire bytes per row.

Prints a table; asserts nothing.  Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import time
from collections.abc import Callable
from multiprocessing.connection import Connection as PipeEnd
from typing import Any

import msgpack
import numpy as np

from traceml.schema import NUMPY_DTYPES, STEP_TIME, rows_to_columns
from traceml.transport import (
    BaseHandler,
    FrameDecoder,
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
)

TOKEN = "bench-token"
BATCH_SIZES = (64, 256, 1024)


def step_rows(n: int, start: int) -> list[tuple[int, ...]]:
    # plausible step_time values: growing steps and timestamps, microsecond phase durations
    return [
        (s, 1_700_000_000_000_000_000 + s * 120_000_000, 0, 120_000, 900, 300, 40_000, 61_000, 15_000, 2_800)
        for s in range(start, start + n)
    ]


# --- the two encodings ----------------------------------------------------------------


def columnar_message(seq: int, rows: list[tuple[int, ...]]) -> dict[str, Any]:
    return batch(seq, {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))}, {})


def dict_rows_message(seq: int, rows: list[tuple[int, ...]]) -> dict[str, Any]:
    names = STEP_TIME.names
    return {"kind": "rows", "seq": seq, "table": "step_time", "rows": [dict(zip(names, r, strict=True)) for r in rows]}


def columnar_decode(msg: dict[str, Any]) -> int:
    _, cols = decode_tables(msg["tables"])["step_time"]
    return len(cols["step"])


def dict_rows_decode(msg: dict[str, Any]) -> int:
    rows = msg["rows"]
    cols = {c.name: np.array([r[c.name] for r in rows], dtype=NUMPY_DTYPES[c.dtype]) for c in STEP_TIME.columns}
    return len(cols["step"])


ENCODINGS: dict[str, tuple[Callable[[int, list[tuple[int, ...]]], dict[str, Any]], Callable[[dict[str, Any]], int]]] = {
    "columnar": (columnar_message, columnar_decode),
    "dict/row": (dict_rows_message, dict_rows_decode),
}


# --- the server process ---------------------------------------------------------------


class _MarkerHandler(BaseHandler):
    """Reports (monotonic time, frames) through the pipe when the marker attachment arrives."""

    def __init__(self, pipe: PipeEnd) -> None:
        self.pipe = pipe

    def on_message(self, conn: Any, msg: dict[str, Any]) -> None:
        if msg["kind"] == "attachment" and msg["name"] == "marker":
            self.pipe.send((time.monotonic(), conn.frames))


def _serve(pipe: PipeEnd) -> None:
    server = TelemetryServer(token=TOKEN, handler=_MarkerHandler(pipe)).start()
    pipe.send(server.port)
    pipe.recv()  # "stop"
    server.stop()


# --- measurements ---------------------------------------------------------------------


def measure_send(port: int, encoding: str, batch_rows: int, total_rows: int, pipe: PipeEnd) -> dict[str, float]:
    make, _ = ENCODINGS[encoding]
    batches = [step_rows(batch_rows, i * batch_rows) for i in range(total_rows // batch_rows)]
    ident = RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, host="bench", pid=0)
    client = TelemetryClient("127.0.0.1", port, hello("bench", TOKEN, ident), buffer_messages=100_000)
    client.send(heartbeat())  # connect (and send the hello) before the clock starts
    bytes0 = client.sent_bytes
    t0 = time.monotonic()
    for seq, rows in enumerate(batches):
        client.send(make(seq, rows))
    while client.pending:
        client.flush(1.0)
    t_sent = time.monotonic()
    data_bytes = client.sent_bytes - bytes0
    client.send(attachment("marker", {}))
    t_recv, frames = pipe.recv()
    client.close()
    if client.dropped_messages or frames != len(batches) + 3:  # + hello, heartbeat, marker
        raise SystemExit(f"benchmark lost data: dropped {client.dropped_messages}, frames {frames}")
    rows = len(batches) * batch_rows
    return {"send_rows_s": rows / (t_sent - t0), "e2e_rows_s": rows / (t_recv - t0), "bytes_row": data_bytes / rows}


def measure_decode(encoding: str, batch_rows: int, total_rows: int) -> float:
    make, decode = ENCODINGS[encoding]
    stream = b"".join(
        encode_frame(make(i, step_rows(batch_rows, i * batch_rows))) for i in range(total_rows // batch_rows)
    )
    t0 = time.perf_counter()
    dec = FrameDecoder()
    rows = 0
    for start in range(0, len(stream), 256 * 1024):  # the server reads 256 KiB at a time
        for msg in dec.iter_feed(stream[start : start + 256 * 1024]):
            rows += decode(msg)
    elapsed = time.perf_counter() - t0
    assert rows == (total_rows // batch_rows) * batch_rows
    return rows / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=131072, help="rows per measurement (default 131072)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the best is kept (default 3)")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(there,), daemon=True)
    proc.start()
    port = here.recv()
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        for size in BATCH_SIZES:
            for encoding in ENCODINGS:
                best: dict[str, float] = {}
                for _ in range(args.repeat):
                    r = measure_send(port, encoding, size, args.rows, here)
                    r["decode_rows_s"] = measure_decode(encoding, size, args.rows)
                    best = {k: max(v, best.get(k, 0.0)) if k != "bytes_row" else v for k, v in r.items()}
                results[(encoding, size)] = best
    finally:
        here.send("stop")
        proc.join(10)

    print(f"traceml transport benchmark  ({args.rows} step_time rows per cell, best of {args.repeat})")
    print(f"python {platform.python_version()}, msgpack {'.'.join(map(str, msgpack.version))}, {platform.machine()}")
    print()
    head = f"{'rows/batch':>10} {'encoding':>9} {'send rows/s':>13} {'e2e rows/s':>12} {'decode rows/s':>14} {'bytes/row':>10}"
    print(head)
    print("-" * len(head))
    for size in BATCH_SIZES:
        for encoding in ENCODINGS:
            r = results[(encoding, size)]
            print(
                f"{size:>10} {encoding:>9} {r['send_rows_s']:>13,.0f} {r['e2e_rows_s']:>12,.0f} "
                f"{r['decode_rows_s']:>14,.0f} {r['bytes_row']:>10.1f}"
            )
        c, d = results[("columnar", size)], results[("dict/row", size)]
        print(
            f"{'':>10} {'ratio':>9} {c['send_rows_s'] / d['send_rows_s']:>12.1f}x {c['e2e_rows_s'] / d['e2e_rows_s']:>11.1f}x "
            f"{c['decode_rows_s'] / d['decode_rows_s']:>13.1f}x {d['bytes_row'] / c['bytes_row']:>9.1f}x"
        )


if __name__ == "__main__":
    main()
