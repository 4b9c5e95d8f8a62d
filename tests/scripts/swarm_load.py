"""Many synthetic ranks over loopback into one real aggregator: the driver shared by
``benchmarks/bench_many_ranks.py`` (256 x 10 steps/s, 1,024 x 1 step/s, 60 s) and
``tests/test_scale_many_ranks.py`` (a few seconds, a node lost).

One process plays every rank: a non-blocking socket per rank speaking the real wire protocol
(hello, then a batch of the steps of the last 0.5 s and a process sample every second, or a
heartbeat when there is nothing; ``rank_finished`` at the end), like the rank runtime does,
without a Python process per rank.  ``kill_node=(node, at_s)`` makes every rank of that node
vanish at once: their sockets are reset, their unsent rows discarded, no ``rank_finished``.
The aggregator (``python -m traceml.aggregator``, standalone) records to a ``.tml``; a thread
samples its resident memory and CPU time.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from fault_harness import clean_env
from fault_load import _wait_listening, free_port

from traceml.schema import PHASES, PROCESS, STEP_TIME
from traceml.transport import RankIdentity, encode_columns
from traceml.transport.framing import encode_frame
from traceml.transport.messages import batch, heartbeat, hello, rank_finished

TOKEN = "swarm-token"
RUN_ID = "swarm-run"
FLUSH_S = 0.5


@dataclass
class SwarmResult:
    ranks: int
    rate: float
    seconds: float
    out: Path
    steps_sent: dict[int, int] = field(default_factory=dict)  # rows the aggregator was sent
    steps_made: dict[int, int] = field(default_factory=dict)  # rows the rank produced (incl. unsent)
    killed: list[int] = field(default_factory=list)
    killed_at_ns: int = 0
    unsent_at_kill: int = 0
    send_stalls: int = 0  # times a rank's socket buffer was full (the generator waited)
    generator_lag_s: float = 0.0  # how far the generator fell behind its schedule at worst
    aggregator_code: int = -1
    aggregator_stderr: str = ""
    wall_s: float = 0.0
    rss_start: int = 0
    rss_max: int = 0
    aggregator_cpu_s: float = 0.0
    cpu_during_load_s: float = 0.0

    @property
    def total_sent(self) -> int:
        return sum(self.steps_sent.values())


class _Rank:
    __slots__ = ("rank", "node", "sock", "out", "step", "pending", "seq", "next_flush", "next_sample", "alive")

    def __init__(self, rank: int, node: int) -> None:
        self.rank = rank
        self.node = node
        self.sock: socket.socket | None = None
        self.out = bytearray()
        self.step = 0
        self.pending: list[tuple[int, int]] = []  # (step, ts_ns)
        self.seq = 0
        self.next_flush = 0.0
        self.next_sample = 0.0
        self.alive = True


def _step_rows(pending: list[tuple[int, int]], rank: int) -> dict[str, np.ndarray]:
    step = np.array([p[0] for p in pending], dtype=np.int64)
    ts = np.array([p[1] for p in pending], dtype=np.int64)
    n = len(step)
    cols: dict[str, np.ndarray] = {"step": step, "ts_ns": ts, "failed": np.zeros(n, dtype=np.uint8)}
    for k, phase in enumerate(PHASES):
        cols[f"{phase}_us"] = 1000 * (k + 1) + (step * 7 + rank) % 100
    cols["step_us"] = sum(cols[f"{p}_us"] for p in PHASES)
    return {c.name: cols[c.name] for c in STEP_TIME.columns}


def _process_row(rank: int) -> dict[str, np.ndarray]:
    return {
        "ts_ns": np.array([time.time_ns()], dtype=np.int64),
        "cpu_pct": np.array([95.0], dtype=np.float32),
        "rss_bytes": np.array([(2 << 30) + rank], dtype=np.int64),
        "threads": np.array([12], dtype=np.int32),
        "fds": np.array([40], dtype=np.int32),
        "gpu_alloc_bytes": np.array([-1], dtype=np.int64),
        "gpu_reserved_bytes": np.array([-1], dtype=np.int64),
        "gpu_total_bytes": np.array([-1], dtype=np.int64),
    }


def run_swarm(
    out_dir: Path,
    ranks: int = 64,
    rate: float = 10.0,
    seconds: float = 5.0,
    nodes: int = 8,
    kill_node: tuple[int, float] | None = None,
    capacity: int = 200_000,
    sample_s: float = 0.5,
) -> SwarmResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "swarm.tml"
    port = free_port()
    env = clean_env(TRACEML_TOKEN=TOKEN)
    cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(port), "--run-id", RUN_ID, "--run-name", "swarm"]
    cmd += ["--expected-ranks", str(ranks), "--nnodes", str(nodes), "--out", str(out), "--capacity", str(capacity)]
    cmd += ["--finish-timeout", "10"]
    err_path = out_dir / "aggregator.stderr"
    started = time.monotonic()
    with err_path.open("wb") as agg_err:
        agg = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=agg_err, stdin=subprocess.DEVNULL)
    result = SwarmResult(ranks=ranks, rate=rate, seconds=seconds, out=out)
    agg_ps = psutil.Process(agg.pid)
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            try:
                rss = int(agg_ps.memory_info().rss)
                cpu = agg_ps.cpu_times()
            except psutil.Error:
                return
            result.rss_max = max(result.rss_max, rss)
            result.aggregator_cpu_s = cpu.user + cpu.system
            stop_sampling.wait(sample_s)

    sampler = threading.Thread(target=sample, name="swarm-sampler", daemon=True)
    per_node = max(1, ranks // nodes)
    swarm = [_Rank(r, min(r // per_node, nodes - 1)) for r in range(ranks)]
    try:
        _wait_listening(agg, port)
        result.rss_start = int(agg_ps.memory_info().rss)
        sampler.start()
        for i, rk in enumerate(swarm):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            ident = RankIdentity(rank=rk.rank, local_rank=rk.rank % per_node, world_size=ranks,
                                 local_world_size=per_node, node_rank=rk.node, host=f"node{rk.node}", pid=10_000 + rk.rank)  # fmt: skip
            sock.sendall(encode_frame(hello(RUN_ID, TOKEN, ident)))
            sock.setblocking(False)
            rk.sock = sock
            if i % 64 == 63:
                time.sleep(0.01)  # within the listen backlog
        cpu0 = agg_ps.cpu_times()
        t0 = time.monotonic()
        for i, rk in enumerate(swarm):  # spread the flushes over the period, as independent ranks do
            rk.next_flush = t0 + FLUSH_S * (i / ranks)
            rk.next_sample = t0 + (i / ranks)
        end = t0 + seconds
        killed = False
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if kill_node is not None and not killed and now - t0 >= kill_node[1]:
                killed = True
                result.killed_at_ns = time.time_ns()
                for rk in swarm:
                    if rk.node == kill_node[0]:
                        _reset(rk)
                        result.killed.append(rk.rank)
                        result.unsent_at_kill += len(rk.pending)
            due = int((now - t0) * rate)
            wall = time.time_ns()
            for rk in swarm:
                if not rk.alive:
                    continue
                while rk.step < due:
                    rk.pending.append((rk.step, wall))
                    rk.step += 1
                if now >= rk.next_flush:
                    rk.next_flush += FLUSH_S
                    _flush(rk, now, result)
                if rk.out:
                    _pump(rk, result)
            result.generator_lag_s = max(result.generator_lag_s, time.monotonic() - now)
            time.sleep(0.005)
        for rk in swarm:
            if rk.alive:
                _flush(rk, time.monotonic(), result, force=True)
                rk.out += encode_frame(rank_finished("ok"))
        deadline = time.monotonic() + 60
        while any(rk.alive and rk.out for rk in swarm) and time.monotonic() < deadline:
            for rk in swarm:
                if rk.alive and rk.out:
                    _pump(rk, result)
            time.sleep(0.002)
        cpu1 = agg_ps.cpu_times()
        result.cpu_during_load_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        for rk in swarm:
            result.steps_made[rk.rank] = rk.step
            if rk.alive and rk.sock is not None:
                rk.sock.close()
        try:
            result.aggregator_code = agg.wait(120)
        except subprocess.TimeoutExpired:
            agg.terminate()
            result.aggregator_code = agg.wait(60)
    finally:
        stop_sampling.set()
        if sampler.is_alive():
            sampler.join(10)
        for rk in swarm:
            if rk.sock is not None:
                rk.sock.close()
        if agg.poll() is None:
            agg.kill()
            agg.wait()
    result.wall_s = time.monotonic() - started
    result.aggregator_stderr = err_path.read_text(errors="replace")
    return result


def _flush(rk: _Rank, now: float, result: SwarmResult, force: bool = False) -> None:
    tables: dict[str, Any] = {}
    if rk.pending:
        tables["step_time"] = encode_columns(STEP_TIME, _step_rows(rk.pending, rk.rank))
        result.steps_sent[rk.rank] = result.steps_sent.get(rk.rank, 0) + len(rk.pending)
        rk.pending = []
    if now >= rk.next_sample:
        rk.next_sample += 1.0
        tables["process"] = encode_columns(PROCESS, _process_row(rk.rank))
    if tables:
        rk.out += encode_frame(batch(rk.seq, tables))
        rk.seq += 1
    elif not force:
        rk.out += encode_frame(heartbeat())


def _pump(rk: _Rank, result: SwarmResult) -> None:
    assert rk.sock is not None
    try:
        sent = rk.sock.send(rk.out)
    except BlockingIOError:
        result.send_stalls += 1
        return
    del rk.out[:sent]
    if rk.out:
        result.send_stalls += 1


def _reset(rk: _Rank) -> None:
    """The node is gone: a reset, nothing more from this rank (its unsent rows die with it)."""
    rk.alive = False
    if rk.sock is not None:
        rk.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        rk.sock.close()
        rk.sock = None
    rk.out.clear()
