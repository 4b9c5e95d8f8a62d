"""A long run through the real aggregator process: 10 M rows, then replay.

    python benchmarks/bench_long_run.py                    # 8 ranks, 10 M step rows
    python benchmarks/bench_long_run.py --rows 2000000     # shorter

``python -m traceml.aggregator`` (what ``traceml run`` starts) records to a ``.tml`` while
``--ranks`` sender processes stream step_time batches (realistic values: increasing steps and
timestamps, noisy phase times) plus a process sample every 1000 steps, as fast as the
aggregator takes them (each sender waits for the socket: back-pressure, no drops).  A sampler
reads the aggregator's resident memory and the file's size against the rows sent:

* live memory flat: the live store keeps ``--capacity`` rows per rank and table, so RSS stops
  growing once that is full, however long the run;
* spool size linear in rows: bytes on disk per row stay the same from the first million on;
* replay within target: ``replay.open(path)`` + loading every row (and the full ``view()``),
  against the format's read target of 5 M rows/s (10 M rows in 2 s).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

TOKEN = "long-run-token"
RUN_ID = "long-run"
BATCH_ROWS = 5000
REPLAY_TARGET_ROWS_PER_S = 5e6


def sender(rank: int, ranks: int, port: int, rows: int, counter: Any, timeline: bool = True) -> None:
    """One rank: ``rows`` step_time rows (and their step_timeline rows) in batches, as fast as the
    socket takes them."""
    from traceml.schema import PHASES, PROCESS, STEP_TIME, STEP_TIMELINE, TIMELINE_PHASES, phase_gaps
    from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, hello, rank_finished

    ident = RankIdentity(
        rank=rank, local_rank=rank, world_size=ranks, local_world_size=ranks, node_rank=0, host="bench", pid=os.getpid()
    )
    client = TelemetryClient("127.0.0.1", port, hello(RUN_ID, TOKEN, ident), buffer_messages=64, send_timeout_s=5.0)
    rng = np.random.default_rng(rank)
    t0 = time.time_ns()
    step = 0
    seq = 0
    while step < rows:
        n = min(BATCH_ROWS, rows - step)
        steps = np.arange(step, step + n, dtype=np.int64)
        phases = {f"{p}_us": rng.normal(1500, 120, n).astype(np.int64) for p in PHASES}
        step_us = sum(phases.values())
        cols = {
            "step": steps,
            "ts_ns": t0 + np.cumsum(step_us * 1000),
            "failed": np.zeros(n, dtype=np.uint8),
            "step_us": step_us,
            **phases,
        }
        t0 = int(cols["ts_ns"][-1])
        tables = {"step_time": encode_columns(STEP_TIME, cols)}
        if timeline:  # what a rank sends beside step_time: each phase's first start in its step
            gap = rng.integers(0, 40, (n, 4))  # µs between phases (Python between the calls)
            fwd0 = phases["dataloader_us"] + gap[:, 0]
            bwd0 = fwd0 + phases["forward_us"] + gap[:, 1]
            opt0 = bwd0 + phases["backward_us"] + gap[:, 2]
            durations = [phases[f"{p}_us"] if p != "h2d" else np.zeros(n, np.int64) for p in TIMELINE_PHASES]
            starts = [np.zeros(n, np.int64), np.full(n, -1, np.int64), fwd0, bwd0, opt0]
            gaps = phase_gaps(durations, starts)
            tl = {
                "step": steps,
                **{f"{p}_gap_us": g.astype(np.int64) for p, g in zip(TIMELINE_PHASES, gaps, strict=True)},
            }
            tables["step_timeline"] = encode_columns(STEP_TIMELINE, tl)
        if step % 1000 == 0 or n < BATCH_ROWS:
            k = max(1, n // 1000)
            proc = {
                "ts_ns": cols["ts_ns"][::1000][:k],
                "cpu_pct": rng.normal(95, 3, k).astype(np.float32),
                "rss_bytes": np.full(k, 3 << 30, dtype=np.int64),
                "threads": np.full(k, 12, dtype=np.int32),
                "fds": np.full(k, 40, dtype=np.int32),
                "gpu_alloc_bytes": np.full(k, -1, dtype=np.int64),
                "gpu_reserved_bytes": np.full(k, -1, dtype=np.int64),
                "gpu_total_bytes": np.full(k, -1, dtype=np.int64),
            }
            tables["process"] = encode_columns(PROCESS, proc)
        seq += 1
        if not client.send(batch(seq, tables)):
            client.flush(timeout_s=120)
        step += n
        with counter.get_lock():
            counter.value += n
    client.send(rank_finished("ok"))
    client.close(drain_timeout_s=120)
    if client.dropped_messages:
        raise SystemExit(f"rank {rank} dropped {client.dropped_messages} messages")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="step rows over all ranks")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--capacity", type=int, default=200_000, help="aggregator --capacity (live rows per rank and table)")
    p.add_argument("--keep", type=Path, default=None, help="keep the recording at this path")
    p.add_argument(
        "--no-timeline", action="store_true", help="send step_time alone (as ranks did before step_timeline)"
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_long_run-") as tmp:
        out = args.keep or Path(tmp) / "long.tml"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
        env["TRACEML_TOKEN"] = TOKEN
        cmd = [
            sys.executable,
            "-m",
            "traceml.aggregator",
            "--port",
            str(port),
            "--run-id",
            RUN_ID,
            "--run-name",
            "long",
        ]
        cmd += ["--expected-ranks", str(args.ranks), "--out", str(out), "--capacity", str(args.capacity)]
        with open(Path(tmp) / "agg.out", "wb") as agg_out:
            agg = subprocess.Popen(cmd, env=env, stdout=agg_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        agg_ps = psutil.Process(agg.pid)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or agg.poll() is not None:
                    raise SystemExit("the aggregator did not start") from None
                time.sleep(0.05)
        rss0 = agg_ps.memory_info().rss
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0)
        per_rank = args.rows // args.ranks
        started = time.monotonic()
        senders = [
            ctx.Process(target=sender, args=(r, args.ranks, port, per_rank, counter, not args.no_timeline))
            for r in range(args.ranks)
        ]
        for s in senders:
            s.start()
        samples: list[tuple[float, int, int, int]] = []  # (s, rows sent, rss, file bytes)
        while any(s.is_alive() for s in senders):
            try:
                rss = agg_ps.memory_info().rss
            except psutil.Error:
                break
            size = out.stat().st_size if out.exists() else 0
            samples.append((time.monotonic() - started, counter.value, rss, size))
            time.sleep(0.25)
        for s in senders:
            s.join()
        send_s = time.monotonic() - started
        code = agg.wait(300)
        total_s = time.monotonic() - started
        if code != 0 or any(s.exitcode for s in senders):
            raise SystemExit(
                f"aggregator exit {code}, senders {[s.exitcode for s in senders]}: {(Path(tmp) / 'agg.out').read_text()[-3000:]}"
            )
        rows = counter.value
        file_bytes = out.stat().st_size

        first = next((x[0] for x in samples if x[1] > 0), 0.0)
        print(f"{args.ranks} ranks, {rows:,} step rows (+ process samples) through python -m traceml.aggregator")
        print(
            f"streamed in {send_s - first:.1f} s once the senders were up ({rows / max(send_s - first, 1e-9) / 1e6:.2f} M rows/s); "
            f"file closed {total_s:.1f} s after the start; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
        )
        print("live memory while rows stream (rows sent = handed to the kernel by the senders):")
        head = f"{'rows sent':>12} {'elapsed s':>10} {'aggregator RSS MiB':>19}"
        print(head)
        print("-" * len(head))
        for mark in [rows * i // 10 for i in range(1, 11)]:
            s = next((x for x in samples if x[1] >= mark), samples[-1])
            print(f"{s[1]:12,} {s[0]:10.1f} {s[2] / 2**20:19.1f}")
        half = [x[2] for x in samples if x[1] >= rows // 2]
        print(
            f"RSS at start {rss0 / 2**20:.1f} MiB; max {max(x[2] for x in samples) / 2**20:.1f} MiB; "
            f"over the second half of the rows {min(half) / 2**20:.1f}..{max(half) / 2**20:.1f} MiB\n"
        )

        from traceml.format import open_recording

        print("the spool on disk, from the file's own index (bytes up to the end of the segment that holds row N):")
        head = f"{'rows in file':>13} {'file MiB':>9} {'B/row':>7} {'B/row of this tenth':>20}"
        print(head)
        print("-" * len(head))
        with open_recording(out) as reader:
            segs = reader.segments
        cum, prev_rows, prev_bytes, at = 0, 0, 0, 1
        for seg in segs:
            cum += sum(seg.rows.values())
            end = seg.offset + seg.length
            while at <= 10 and cum >= rows * at // 10:
                print(
                    f"{cum:13,} {end / 2**20:9.1f} {end / cum:7.2f} {(end - prev_bytes) / max(cum - prev_rows, 1):20.2f}"
                )
                prev_rows, prev_bytes, at = cum, end, at + 1
        print(
            f"{'closed':>13} {file_bytes / 2**20:9.1f} {file_bytes / rows:7.2f}   (index, attachments, summary, footer included)"
        )

        import replay

        t = time.perf_counter()
        c0 = time.process_time()
        rec = replay.open(out)
        loaded = rec.load()
        load_s, load_cpu = time.perf_counter() - t, time.process_time() - c0
        n_loaded = sum(len(next(iter(cols.values()))) for ranks_cols in loaded.values() for cols in ranks_cols.values())
        del loaded
        rec.close()
        t = time.perf_counter()
        with replay.open(out) as fresh:
            view = fresh.view()
        view_s = time.perf_counter() - t
        step_rows = sum(len(view.columns("step_time", r)["step"]) for r in view.ranks)
        target_s = rows / REPLAY_TARGET_ROWS_PER_S
        print(
            f"\nreplay.open + load every table: {n_loaded:,} rows in {load_s:.2f} s wall ({n_loaded / load_s / 1e6:.1f} M rows/s), "
            f"{load_cpu:.2f} s CPU; target {target_s:.1f} s ({REPLAY_TARGET_ROWS_PER_S / 1e6:.0f} M rows/s): "
            f"{'met' if load_s <= target_s else 'NOT met'}"
        )
        print(
            f"replay.open + view() (the live views' StoreView): {view_s:.2f} s wall; step_time rows {step_rows:,} "
            f"({'all' if step_rows == rows else 'MISSING ' + str(rows - step_rows)})"
        )
        print(f"integrity: {(view.integrity or {}).get('status')}")


if __name__ == "__main__":
    main()
