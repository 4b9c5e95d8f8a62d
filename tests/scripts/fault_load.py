"""The load driver shared by ``tests/test_scale_load.py`` (a few seconds) and
``benchmarks/bench_load.py`` (16 ranks x 1000 steps/s x 60 s).

One real aggregator process (``python -m traceml.aggregator``, standalone: it ends once every
expected rank finished) records to a ``.tml``; N synthetic ranks are real processes running the
rank runtime (``fault_steps.py``: ``trace_step`` in a paced loop, no torch) that stream to it
over loopback.  A thread samples the aggregator's resident memory and CPU time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from fault_harness import FAULT_STEPS, clean_env

TOKEN = "load-token"
RUN_ID = "load-run"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LoadResult:
    ranks: int
    rate: float
    seconds: float
    out: Path
    #: per rank: steps it ran, seconds it took, exit code
    steps: dict[int, int] = field(default_factory=dict)
    rank_seconds: dict[int, float] = field(default_factory=dict)
    rank_codes: dict[int, int] = field(default_factory=dict)
    aggregator_code: int = -1
    aggregator_stdout: str = ""
    aggregator_stderr: str = ""
    wall_s: float = 0.0
    rss_start: int = 0
    rss_max: int = 0
    #: (seconds since start, rss bytes) every sample
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    aggregator_cpu_s: float = 0.0

    @property
    def total_steps(self) -> int:
        return sum(self.steps.values())


def run_load(
    out_dir: Path,
    ranks: int = 16,
    rate: float = 1000.0,
    seconds: float = 5.0,
    small_capacity_ranks: int = 0,
    burst: int = 10,
    capacity: int = 200_000,
    sample_s: float = 0.5,
) -> LoadResult:
    """Run the load; the last ``small_capacity_ranks`` ranks keep 64 rows per table (they drop, counted)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "load.tml"
    port = free_port()
    steps = int(rate * seconds)
    env = clean_env(TRACEML_TOKEN=TOKEN)
    agg_out = open(out_dir / "aggregator.stdout", "wb")  # noqa: SIM115 - closed below
    agg_err = open(out_dir / "aggregator.stderr", "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(port), "--run-id", RUN_ID, "--run-name", "load"]
    cmd += ["--expected-ranks", str(ranks), "--out", str(out), "--capacity", str(capacity), "--finish-timeout", "10"]
    started = time.monotonic()
    agg = subprocess.Popen(cmd, env=env, stdout=agg_out, stderr=agg_err, stdin=subprocess.DEVNULL)
    result = LoadResult(ranks=ranks, rate=rate, seconds=seconds, out=out)
    procs: dict[int, subprocess.Popen[str]] = {}
    stop_sampling = threading.Event()
    agg_ps = psutil.Process(agg.pid)

    def sample() -> None:
        while not stop_sampling.is_set():
            try:
                rss = int(agg_ps.memory_info().rss)
                cpu = agg_ps.cpu_times()
            except psutil.Error:
                return
            result.rss_samples.append((time.monotonic() - started, rss))
            result.rss_max = max(result.rss_max, rss)
            result.aggregator_cpu_s = cpu.user + cpu.system
            stop_sampling.wait(sample_s)

    sampler = threading.Thread(target=sample, name="load-sampler", daemon=True)
    try:
        _wait_listening(agg, port)
        result.rss_start = int(agg_ps.memory_info().rss)
        sampler.start()
        for rank in range(ranks):
            rank_env = dict(env)
            rank_env.update(
                TRACEML_AGGREGATOR_HOST="127.0.0.1",
                TRACEML_AGGREGATOR_PORT=str(port),
                TRACEML_RUN_ID=RUN_ID,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(ranks),
                LOCAL_WORLD_SIZE=str(ranks),
                GROUP_RANK="0",
            )
            args = [sys.executable, FAULT_STEPS, "--steps", str(steps), "--rate", str(rate), "--burst", str(burst)]
            if rank >= ranks - small_capacity_ranks:
                args += ["--capacity", "64"]
            procs[rank] = subprocess.Popen(
                args, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        timeout = max(120.0, seconds * 4)
        for rank, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            result.rank_codes[rank] = proc.returncode
            m = re.search(r"done rank=(\d+) steps=(\d+) seconds=([\d.]+)", stdout)
            if m is None:
                raise AssertionError(f"rank {rank} did not finish (exit {proc.returncode}): {stderr[-2000:]}")
            result.steps[rank] = int(m.group(2))
            result.rank_seconds[rank] = float(m.group(3))
        try:
            result.aggregator_code = agg.wait(60)
        except subprocess.TimeoutExpired:
            agg.terminate()  # the aggregator closes the file on SIGTERM
            result.aggregator_code = agg.wait(60)
    finally:
        stop_sampling.set()
        if sampler.is_alive():
            sampler.join(10)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        if agg.poll() is None:
            agg.kill()
            agg.wait()
        agg_out.close()
        agg_err.close()
    result.wall_s = time.monotonic() - started
    result.aggregator_stdout = (out_dir / "aggregator.stdout").read_text(errors="replace")
    result.aggregator_stderr = (out_dir / "aggregator.stderr").read_text(errors="replace")
    return result


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the aggregator did not listen on {port} (exit {proc.poll()})") from None
            time.sleep(0.02)


if __name__ == "__main__":  # a quick manual run: python tests/scripts/fault_load.py OUT_DIR [SECONDS]
    r = run_load(Path(sys.argv[1]), seconds=float(sys.argv[2]) if len(sys.argv) > 2 else 5.0)
    print(r.steps, r.rank_seconds, r.aggregator_code, os.path.getsize(r.out))
