"""Aggregator memory under decode-amplification frames from a peer holding the token.

    python benchmarks/bench_decode_amplification.py                 # 4 and 16 MiB frames, 3 rounds
    python benchmarks/bench_decode_amplification.py --sizes 16 --rounds 5
    python benchmarks/bench_decode_amplification.py --cost-only      # only the budget's cost on real batches

A real ``python -m traceml.aggregator`` listens on 127.0.0.1.  A hostile peer says a valid hello
(it holds the token) and sends one well-formed frame of a kind that decodes to far more memory
than its bytes: arrays of empty arrays, empty maps, 2-character strings, small ints.  For each
frame the table prints the aggregator's resident memory before it, the peak while it is decoded
(sampled every 5 ms) and after it, and the peak growth per frame byte.  Every hostile frame is
sent twice, interleaved: under the default decode budget (``TRACEML_MAX_OBJECTS_PER_KIB`` 64:
16384 objects + one per 16 frame bytes) and under the largest one (1024 per KiB: one object per
byte, which the string and int frames meet; close to the aggregator before the budget, which
allowed an array as long as the frame).  The baseline row
is a real batch of ``step_time`` rows of the same size (numbers travel as bytes).  Each
aggregator serves one budget for all rounds.  Last, what the budget costs on real traffic: the
time to decode a batch of every standard table (200 rows each, one str column) with
``decode_payload`` against the same ``msgpack.unpackb`` call without the counting hooks,
interleaved.  No assertions (tests/test_security_decode.py holds the bound).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import psutil

from traceml.aggregator.control import exit_line
from traceml.schema import STEP_TIME
from traceml.transport import RankIdentity, encode_columns, encode_frame, hello
from traceml.transport.framing import HEADER

TOKEN = "amplify-token"
RUN_ID = "amplify-run"
MiB = 1 << 20

#: what one element of each hostile frame is (msgpack bytes)
ITEMS = {
    "empty arrays": b"\x90",
    "empty maps": b"\x80",
    "2-char strings": b"\xa2ab",
    "small ints": b"\xcd\x01\x02",
}


def hostile_frame(item: bytes, size: int) -> bytes:
    """``{"kind": "batch", "seq": 1, "tables": {"x": [[item * 60000], ...]}}`` of about *size* bytes:
    many arrays of 60,000 elements, so that no single array is over the budget at its header."""
    total = size // len(item)
    chunk = 60_000
    parts = []
    while total > 0:
        n = min(chunk, total)
        parts.append(b"\xdd" + n.to_bytes(4, "big") + item * n)
        total -= n
    # a map of 3 keys: kind, seq and tables -> {"x": [parts...]}
    body = b"\x83" + msgpack.packb("kind") + msgpack.packb("batch") + msgpack.packb("seq") + msgpack.packb(1)
    body += msgpack.packb("tables") + b"\x81" + msgpack.packb("x") + b"\xdd" + len(parts).to_bytes(4, "big")
    body += b"".join(parts)
    return HEADER.pack(len(body)) + body


def real_batch(size: int) -> bytes:
    rows = size // (len(STEP_TIME.columns) * 8)
    cols = {c.name: np.arange(rows, dtype="<i8") for c in STEP_TIME.columns}
    cols["failed"] = np.zeros(rows, "u1")
    return encode_frame({"kind": "batch", "seq": 1, "tables": {"step_time": encode_columns(STEP_TIME, cols)}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Aggregator:
    def __init__(self, tmp: Path, per_kib: int) -> None:
        self.port = free_port()
        env = {**os.environ, "TRACEML_TOKEN": TOKEN, "TRACEML_MAX_OBJECTS_PER_KIB": str(per_kib)}
        cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(self.port), "--run-id", RUN_ID]
        cmd += ["--expected-ranks", "64", "--out", str(tmp / f"run{per_kib}.tml"), "--control-stdin"]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the aggregator did not listen")

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(exit_line(0, "", 1.0))
            self.proc.stdin.close()
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def send(agg: Aggregator, rank: int, frame: bytes) -> tuple[int, int, int, bool]:
    """RSS before, peak, after (once the aggregator has judged the frame) and whether it cut us off."""
    ident = RankIdentity(rank=rank, local_rank=0, world_size=64, local_world_size=1, host="bench", pid=os.getpid())
    before = agg.rss()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], agg.rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cut = False
    with socket.create_connection(("127.0.0.1", agg.port), timeout=30) as s:
        s.sendall(encode_frame(hello(RUN_ID, TOKEN, ident)))
        s.sendall(frame)
        s.settimeout(0.5)
        cpu = sum(agg.ps.cpu_times()[:2])
        while True:  # until the aggregator closes us (refused) or goes idle with us open (accepted)
            try:
                cut = s.recv(1) == b""
                break
            except TimeoutError:
                now = sum(agg.ps.cpu_times()[:2])
                if now - cpu < 0.02:
                    break
                cpu = now
    time.sleep(0.3)
    stop.set()
    sampler.join()
    return before, peak[0], agg.rss(), cut


def budget_cost(rounds: int = 5, calls: int = 2000) -> None:
    from traceml.schema import NUMPY_DTYPES, STANDARD_TABLES
    from traceml.transport.framing import decode_payload

    tables = {}
    for name, schema in STANDARD_TABLES.items():
        cols = {
            c.name: [f"region{i % 7}" for i in range(200)]
            if c.dtype == "str"
            else np.arange(200).astype(NUMPY_DTYPES[c.dtype])
            for c in schema.columns
        }
        tables[name] = encode_columns(schema, cols)
    payload = encode_frame({"kind": "batch", "seq": 1, "tables": tables})[4:]
    size = len(payload)

    def unbudgeted(p: bytes) -> object:
        return msgpack.unpackb(
            p, raw=False, strict_map_key=True, max_bin_len=size, max_str_len=size, max_array_len=size,
            max_map_len=size // 2, max_ext_len=0,
        )  # fmt: skip

    times: dict[str, list[float]] = {"without the budget": [], "decode_payload (budget)": []}
    for _ in range(rounds):
        for name, fn in (("without the budget", unbudgeted), ("decode_payload (budget)", decode_payload)):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(payload)
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    base = sorted(times["without the budget"])[rounds // 2]
    print(f"\ndecode of a real batch ({size} bytes, {len(tables)} tables x 200 rows), median of {rounds} rounds:")
    for name, values in times.items():
        median = sorted(values)[rounds // 2]
        print(f"  {name:<26} {median:>7.1f} us   {median / base:>5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16], help="frame sizes in MiB (at most 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cost-only", action="store_true", help="only the budget's cost on real batches")
    args = parser.parse_args()
    if args.cost_only:
        budget_cost()
        return
    with tempfile.TemporaryDirectory() as tmp:
        aggs = {64: Aggregator(Path(tmp), 64), 1024: Aggregator(Path(tmp), 1024)}
        rank = 0
        rows: list[tuple[str, int, int, int, int, int, bool]] = []
        try:
            for _ in range(args.rounds):
                for size in args.sizes:
                    frames = {"real step_time batch": real_batch(size * MiB - 4096)}
                    frames.update({name: hostile_frame(item, size * MiB - 4096) for name, item in ITEMS.items()})
                    for name, frame in frames.items():
                        for per_kib, agg in aggs.items():  # interleaved: the same frame under both budgets
                            rank += 1
                            before, peak, after, cut = send(agg, rank % 64, frame)
                            rows.append((name, per_kib, len(frame), before, peak, after, cut))
        finally:
            for agg in aggs.values():
                agg.close()
    print(f"{'frame':<22} {'budget/KiB':>10} {'MiB':>5} {'RSS before':>10} {'peak':>8} {'after':>8}"
          f" {'peak growth / frame byte':>25} {'refused':>8}")  # fmt: skip
    for name, per_kib, n, before, peak, after, cut in rows:
        print(
            f"{name:<22} {per_kib:>10} {n / MiB:>5.1f} {before / MiB:>9.0f}M {peak / MiB:>7.0f}M {after / MiB:>7.0f}M"
            f" {(peak - before) / n:>25.2f} {'yes' if cut else 'no':>8}"
        )
    worst = {}
    for name, per_kib, n, before, peak, _, _ in rows:
        key = (per_kib, name)
        worst[key] = max(worst.get(key, 0.0), (peak - before) / n)
    print("\nworst peak growth per frame byte, default budget (64/KiB) vs the largest (1024/KiB):")
    for name in ["real step_time batch", *ITEMS]:
        a, b = worst[(64, name)], worst[(1024, name)]
        ratio = f"{b / a:.1f}x" if a > 0.01 else "n/a"
        print(f"  {name:<22} {a:>6.2f} vs {b:>6.2f}   (largest / default: {ratio})")
    budget_cost()


if __name__ == "__main__":
    main()
