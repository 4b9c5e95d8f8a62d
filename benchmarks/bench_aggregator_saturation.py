"""Where one aggregator saturates: frames encoded once and replayed from several generator
processes over many loopback connections into a real ``python -m traceml.aggregator`` (no
assertions; prints a table).

    .venv/bin/python benchmarks/bench_aggregator_saturation.py                 # the default grid
    .venv/bin/python benchmarks/bench_aggregator_saturation.py --seconds 10 --conns 256 --rows 1,20

``benchmarks/bench_many_ranks.py`` builds every batch in one Python process, which saturates
before the aggregator does.  Here each configuration encodes ONE batch frame (``--rows`` step
rows, what a rank sends per 0.5 s flush at 2x that many steps/s) and the generators only copy its
bytes into their sockets, so they can offer far more than the aggregator takes:

- ``max``: every connection sends as fast as the aggregator reads (closed loop): the aggregator
  is the bottleneck by construction and its CPU share of one core shows whether it is saturated;
- ``offered``: each connection sends at a fixed rate (open loop) at fractions of the ``max``
  figure; ``backlog`` is how far behind schedule the senders ended (frames the aggregator had
  not taken yet), the sign that it no longer keeps up.

A window runs from the start of the load until the aggregator has drained what it was sent (no
byte left in any of its connections' kernel queues, ``/proc/net/tcp``, then its CPU falls idle);
messages are counted from the recording (step rows / rows per frame), so the rates are what the
aggregator parsed, stored and wrote.  Then every rank finishes and the file is checked.
``µs CPU/msg`` (the aggregator's own CPU seconds over the messages) is the figure that holds on a
shared machine: one core saturates at about 1e6 / that many messages/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))
from fault_harness import clean_env
from fault_load import _wait_listening, free_port

from traceml.format import open_recording
from traceml.schema import PHASES, STEP_TIME
from traceml.transport import RankIdentity, encode_columns
from traceml.transport.framing import encode_frame
from traceml.transport.messages import batch, hello, rank_finished

TOKEN = "saturation-token"
RUN_ID = "saturation-run"
SNDBUF = 64 * 1024  # per connection: bounds what sits unread in the kernel when the load stops


def queued_bytes(port: int) -> int:
    """Bytes waiting in the kernel on the connections to ``port`` (either end), Linux only."""
    total = 0
    hexport = f":{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] == "0A":  # the listener
                continue
            if parts[1].endswith(hexport) or parts[2].endswith(hexport):
                tx, rx = parts[4].split(":")
                total += int(tx, 16) + int(rx, 16)
    return total


def frame_of(rows: int) -> bytes:
    """One batch of ``rows`` step rows, encoded once (the rank comes from the connection)."""
    step = np.arange(rows, dtype=np.int64)
    cols: dict[str, np.ndarray] = {
        "step": step,
        "ts_ns": np.full(rows, time.time_ns(), dtype=np.int64),
        "failed": np.zeros(rows, dtype=np.uint8),
    }
    for k, phase in enumerate(PHASES):
        cols[f"{phase}_us"] = 1000 * (k + 1) + step % 100
    cols["step_us"] = np.sum([cols[f"{p}_us"] for p in PHASES], axis=0)
    wire = encode_columns(STEP_TIME, {c.name: cols[c.name] for c in STEP_TIME.columns})
    return encode_frame(batch(0, {"step_time": wire}))


def generator(
    port: int, ranks: list[int], world: int, frame: bytes, rate: float, t0: float, seconds: float, conn: Any
) -> None:
    """One generator process: its ranks' connections, the frame replayed until ``t0 + seconds``
    (``rate`` frames/s per connection, 0: as fast as the socket takes them).  Niced: on a shared
    machine the aggregator, not the generators, gets the CPU first."""
    os.nice(10)
    socks: list[socket.socket] = []
    for i, r in enumerate(ranks):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        ident = RankIdentity(rank=r, local_rank=r % 8, world_size=world, local_world_size=8, node_rank=r // 8,
                             host=f"node{r // 8}", pid=20_000 + r)  # fmt: skip
        s.sendall(encode_frame(hello(RUN_ID, TOKEN, ident)))
        s.setblocking(False)
        socks.append(s)
        if i % 64 == 63:
            time.sleep(0.01)  # within the listen backlog
    conn.send("connected")
    sel = selectors.DefaultSelector()
    offset = [0] * len(socks)  # bytes of the current frame already sent
    sent = [0] * len(socks)  # whole frames sent
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_WRITE, i)
    view = memoryview(frame)
    size = len(frame)
    while time.time() < t0:
        time.sleep(0.001)
    end = t0 + seconds
    while True:
        now = time.time()
        if now >= end:
            break
        due = int((now - t0) * rate) + 1 if rate else 0
        progressed = False
        for key, _ in sel.select(timeout=0.01):
            i = key.data
            if rate and sent[i] >= due and offset[i] == 0:
                continue
            try:
                n = socks[i].send(view[offset[i] :])
            except BlockingIOError:
                continue
            offset[i] += n
            progressed = True
            if offset[i] == size:
                offset[i] = 0
                sent[i] += 1
        if rate and not progressed:
            time.sleep(0.001)  # on schedule, or every late socket is full: do not spin
    owed = sum(max(0, int(seconds * rate) - s) for s in sent) if rate else 0
    for i, s in enumerate(socks):  # finish the frame in flight, then nothing until told
        s.setblocking(True)
        if offset[i]:
            s.sendall(view[offset[i] :])
            sent[i] += 1
    conn.send((sum(sent), owed))
    conn.recv()  # the aggregator has drained: finish every rank
    for s in socks:
        s.sendall(encode_frame(rank_finished("ok")))
        s.close()
    conn.send("done")


def run(tmp: Path, conns: int, rows: int, rate: float, seconds: float, gens: int) -> dict[str, Any]:
    out = tmp / f"c{conns}-r{rows}-{rate:g}.tml"
    port = free_port()
    cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(port), "--run-id", RUN_ID, "--out", str(out)]
    cmd += ["--expected-ranks", str(conns), "--nnodes", str(max(1, conns // 8)), "--capacity", "20000"]
    cmd += ["--finish-timeout", "30"]
    agg = subprocess.Popen(cmd, env=clean_env(TRACEML_TOKEN=TOKEN), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)  # fmt: skip
    procs: list[tuple[mp.Process, Any]] = []
    try:
        _wait_listening(agg, port)
        ps = psutil.Process(agg.pid)
        frame = frame_of(rows)
        t0 = time.time() + 2.0 + conns / 500
        for g in range(gens):
            mine, theirs = mp.Pipe()
            ranks = list(range(g, conns, gens))
            p = mp.Process(target=generator, args=(port, ranks, conns, frame, rate, t0, seconds, theirs), daemon=True)
            p.start()
            procs.append((p, mine))
        for _, pipe in procs:
            assert pipe.recv() == "connected"
        while time.time() < t0:
            time.sleep(0.001)
        cpu0 = sum(ps.cpu_times()[:2])
        w0 = time.monotonic()
        sent = owed = 0
        for _, pipe in procs:
            s, o = pipe.recv()
            sent += s
            owed += o
        load_end = time.monotonic()
        # drained: nothing left unread in the kernel, then the aggregator's CPU falls idle
        empty = 0
        while time.monotonic() - load_end < 300 and empty < 3:
            empty = empty + 1 if queued_bytes(port) == 0 else 0
            time.sleep(0.02)
        last = sum(ps.cpu_times()[:2])
        idle_since = None
        t_empty = time.monotonic()
        while time.monotonic() - t_empty < 2.0:
            time.sleep(0.05)
            now_cpu = sum(ps.cpu_times()[:2])
            busy = now_cpu - last > 0.005
            last = now_cpu
            if busy:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= 0.2:
                break
        w1 = idle_since or time.monotonic()
        cpu1 = last
        for _, pipe in procs:
            pipe.send("finish")
        for p, pipe in procs:
            pipe.recv()
            p.join(30)
        code = agg.wait(180)
    finally:
        for p, _ in procs:
            if p.is_alive():
                p.kill()
        if agg.poll() is None:
            agg.kill()
            agg.wait()
    with open_recording(out) as rec:
        status = rec.integrity["status"]
        recorded = sum(n for seg in rec.segments for (_r, t), n in seg.rows.items() if t == "step_time")
    window = w1 - w0
    msgs = recorded / rows
    return {
        "conns": conns,
        "rows": rows,
        "mode": f"{rate * conns:,.0f}/s" if rate else "max",
        "msgs_s": msgs / window,
        "rank_steps_s": recorded / window,
        "cpu": (cpu1 - cpu0) / window,
        "us_msg": 1e6 * (cpu1 - cpu0) / max(1.0, msgs),
        "drain_s": w1 - load_end,
        "backlog": owed / max(1, rate * conns) if rate else 0.0,
        "lost": sent * rows - recorded,
        "file": status,
        "exit": code,
        "bytes": len(frame_of(rows)),
    }


def show_head() -> None:
    head = (
        f"{'conns':>6} {'rows/msg':>8} {'frame B':>8} {'offered':>10} {'msgs/s':>9} {'rank-steps/s':>13}"
        f" {'agg CPU':>8} {'µs CPU/msg':>10} {'drain s':>8} {'backlog s':>9} {'lost':>5} {'file':>9}"
    )
    print(head)
    print("-" * len(head), flush=True)


def show(r: dict[str, Any]) -> None:
    print(
        f"{r['conns']:>6} {r['rows']:>8} {r['bytes']:>8,} {r['mode']:>10} {r['msgs_s']:>9,.0f}"
        f" {r['rank_steps_s']:>13,.0f} {100 * r['cpu']:>7.0f}% {r['us_msg']:>10.1f} {r['drain_s']:>8.2f}"
        f" {r['backlog']:>9.2f} {r['lost']:>5,} {r['file']:>9}",
        flush=True,
    )


def fit(rows: list[dict[str, Any]]) -> None:
    """CPU share = fixed + cost x messages/s over the runs of one configuration: where one core
    (share 1.0) runs out at this per-message cost."""
    if len(rows) < 2:
        return
    x = np.array([r["msgs_s"] for r in rows])
    y = np.array([r["cpu"] for r in rows])
    if np.ptp(x) <= 0:
        return
    cost, fixed = np.polyfit(x, y, 1)
    if cost <= 0:
        print("   fit: CPU does not grow with the rate here (noise); no estimate", flush=True)
        return
    sat = (1.0 - fixed) / cost
    print(
        f"   fit: {100 * fixed:.0f}% fixed + {1e6 * cost:.1f} µs per message -> one core at ~{sat:,.0f} msgs/s"
        f" = {sat * rows[0]['rows']:,.0f} rank-steps/s",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--conns", default="256,1024", help="connections (ranks), comma-separated")
    ap.add_argument("--rows", default="1,5,20", help="step rows per frame, comma-separated")
    ap.add_argument("--generators", type=int, default=2)
    ap.add_argument("--fractions", default="0.5,0.8,1.2", help="offered rates as fractions of max (open loop)")
    ap.add_argument("--rates", default="", help="offered messages/s in all (open loop) instead of --fractions")
    ap.add_argument("--no-max", action="store_true", help="skip the closed-loop run")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {load:.1f}; {args.generators} generators")
    show_head()
    with tempfile.TemporaryDirectory(prefix="bench_saturation-") as tmp_dir:
        tmp = Path(tmp_dir)
        for conns in [int(c) for c in args.conns.split(",")]:
            for rows in [int(r) for r in args.rows.split(",")]:
                done: list[dict[str, Any]] = []
                if not args.no_max:
                    done.append(run(tmp, conns, rows, 0.0, args.seconds, args.generators))
                    show(done[-1])
                if args.rates:
                    offered = [float(x) for x in args.rates.split(",") if x]
                else:
                    offered = [float(x) * done[0]["msgs_s"] for x in args.fractions.split(",") if x]
                for total in offered:
                    done.append(run(tmp, conns, rows, total / conns, args.seconds, args.generators))
                    show(done[-1])
                fit(done)
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
