"""Overhead per step and bytes on disk: traceml against a bare loop and against upstream TraceML.

The same loop (MLP 512-512-10, batch 64, SGD, a one-thread DataLoader with num_workers=0,
torch.set_num_threads(1)) runs three ways, each in its own process, interleaved in random
order for several rounds of the same invocation:

* ``bare``      plain ``python loop.py`` in this venv, no profiler;
* ``traceml``   ``traceml run --ui none --out run.tml loop.py`` (this repo: aggregator, spool, recording);
* ``upstream``  ``traceml run --mode summary loop.py`` of upstream ``traceml-ai`` 0.5.0 from
  ``--upstream-venv`` (its aggregator and SQLite store), ``traceml.init(mode="auto")`` in the loop.

Each process times every step (from the end of one step to the end of the next, so the
DataLoader's ``next()`` is included) after a warm-up and prints the median; start-up and
shut-down are not timed.  Bytes on disk per rank-step: the ``.tml`` file, and upstream's
SQLite telemetry database (``logs/<run>/aggregator/telemetry`` plus its -wal/-shm), each
divided by the steps of the run.

    python benchmarks/bench_vs_upstream.py                 # 3 rounds x 2000 steps
    python benchmarks/bench_vs_upstream.py --rounds 5 --steps 3000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOP = r"""
import json, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

mode, steps, warmup, cpu_pin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if cpu_pin >= 0:  # the training thread only (the profilers' threads already exist and run anywhere)
    import os
    os.sched_setaffinity(0, {cpu_pin})
torch.set_num_threads(1)
torch.manual_seed(0)
if mode == "traceml":
    import traceml
    ctx = traceml.trace_step
elif mode == "upstream":
    import traceml_ai as traceml
    traceml.init(mode="auto")
    ctx = traceml.trace_step
else:
    import contextlib
    ctx = lambda model: contextlib.nullcontext()

model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
data = TensorDataset(torch.randn(64 * 128, 512), torch.randint(0, 10, (64 * 128,)))
loader = DataLoader(data, batch_size=64, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
times, cpu, step, last, last_cpu, proc0 = [], [], 0, None, None, 0.0
while step < steps + warmup:
    for x, y in loader:
        with ctx(model):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        now, now_cpu = time.perf_counter(), time.thread_time()
        if last is not None and step >= warmup:
            times.append(now - last)
            cpu.append(now_cpu - last_cpu)
        if step == warmup - 1:
            proc0 = time.process_time()
        last, last_cpu = now, now_cpu
        step += 1
        if step >= steps + warmup:
            break
proc_us = (time.process_time() - proc0) / len(times) * 1e6
times.sort()
cpu.sort()
print("RESULT " + json.dumps({
    "mode": mode, "steps": step, "timed": len(times),
    "median_us": times[len(times) // 2] * 1e6,
    "mean_us": sum(times) / len(times) * 1e6,
    "p90_us": times[int(len(times) * 0.9)] * 1e6,
    "thread_cpu_us": cpu[len(cpu) // 2] * 1e6,
    "process_cpu_us": proc_us,
}), flush=True)
"""

ROOT = Path(__file__).resolve().parents[1]
OURS = str(Path(sys.executable).parent / "traceml")


def _env() -> dict[str, str]:
    drop = ("TRACEML_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run_variant(
    variant: str, work: Path, loop: Path, steps: int, warmup: int, upstream_venv: Path, n: int, pin: int
) -> dict[str, float]:
    run_dir = work / f"{variant}-{n}"
    run_dir.mkdir()
    args = [variant, str(steps), str(warmup), str(pin)]
    if variant == "bare":
        cmd = [sys.executable, str(loop), *args]
    elif variant == "traceml":
        cmd = [OURS, "run", "--ui", "none", "--out", str(run_dir / "run.tml"), str(loop), *args]
    else:
        cmd = [str(upstream_venv / "bin" / "traceml"), "run", "--mode", "summary", "--logs-dir", str(run_dir / "logs")]
        cmd += ["--run-name", f"r{n}", "--no-dashboard-auto-open", str(loop), "--args", *args]
    started = time.monotonic()
    res = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, env=_env(), timeout=1800)
    wall = time.monotonic() - started
    text = res.stdout
    if variant == "upstream":  # upstream keeps the training's stdout in its logs
        log = run_dir / "logs" / f"r{n}" / "nodes" / "node_0" / "training.stdout.log"
        text += log.read_text() if log.exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        raise SystemExit(f"{variant} run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    out = json.loads(line[len("RESULT ") :])
    out["wall_s"] = wall
    out["disk_bytes"] = float(_disk_bytes(variant, run_dir, n))
    return out


def _disk_bytes(variant: str, run_dir: Path, n: int) -> int:
    if variant == "traceml":
        return (run_dir / "run.tml").stat().st_size
    if variant == "upstream":
        base = run_dir / "logs" / f"r{n}" / "aggregator" / "telemetry"
        return sum(
            p.stat().st_size
            for p in (base, base.with_name("telemetry-wal"), base.with_name("telemetry-shm"))
            if p.exists()
        )
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--upstream-venv", type=Path, default=Path("/work/upstream-venv"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pin",
        type=int,
        default=-1,
        help="pin the training thread to this CPU (default -1: no pinning; it did not steady this VM)",
    )
    args = p.parse_args()
    variants = ["bare", "traceml"]
    if (args.upstream_venv / "bin" / "traceml").exists():
        variants.append("upstream")
    else:
        print(f"note: no upstream venv at {args.upstream_venv}; comparing with the bare loop only")
    rng = random.Random(args.seed)
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench_vs_upstream-") as tmp:
        work = Path(tmp)
        loop = work / "loop.py"
        loop.write_text(LOOP)
        for r in range(args.rounds):
            order = variants[:]
            rng.shuffle(order)
            for v in order:
                res = run_variant(v, work, loop, args.steps, args.warmup, args.upstream_venv, r, args.pin)
                results[v].append(res)
                print(
                    f"round {r + 1}/{args.rounds} {v:9} median {res['median_us']:8.1f} us/step  wall {res['wall_s']:5.1f} s",
                    flush=True,
                )

    def med(v: str, key: str) -> float:
        return statistics.median(x[key] for x in results[v])

    def paired(v: str, key: str) -> float:
        """Median over rounds of (variant - bare) within the same round."""
        return statistics.median(a[key] - b[key] for a, b in zip(results[v], results["bare"], strict=True))

    print(f"\nMLP 512-512-10, batch 64, 1 thread; {args.steps} timed steps per run, {args.rounds} interleaved rounds;")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    head = (
        f"{'variant':10} {'wall us/step':>13} {'best round':>11} {'+wall us':>9} {'+wall %':>8} "
        f"{'step CPU us':>12} {'+step CPU us':>13} {'process CPU us':>15} {'+process CPU us':>16} {'B/rank-step':>12}"
    )
    print(head)
    print("-" * len(head))
    bare_wall = med("bare", "median_us")
    for v in variants:
        disk = statistics.median(x["disk_bytes"] / x["steps"] for x in results[v])
        disk_s = "-" if v == "bare" else f"{disk:.1f}"
        best = min(x["median_us"] for x in results[v])
        print(
            f"{v:10} {med(v, 'median_us'):13.1f} {best:11.1f} {paired(v, 'median_us'):9.1f} {100 * paired(v, 'median_us') / bare_wall:7.2f}% "
            f"{med(v, 'thread_cpu_us'):12.1f} {paired(v, 'thread_cpu_us'):13.1f} {med(v, 'process_cpu_us'):15.1f} "
            f"{paired(v, 'process_cpu_us'):16.1f} {disk_s:>12}"
        )
    print(
        "\nwall us/step: median over rounds of each run's median step (DataLoader next() included); best round: the lowest;"
    )
    print(
        "+...: median over rounds of (variant - bare) in the same round.  step CPU: the training thread's CPU time per step"
    )
    print("(time.thread_time, immune to other processes); process CPU: every thread of the rank process per step (the")
    print(
        "profiler's own threads included).  B/rank-step: the run's whole store on disk (.tml, or upstream's SQLite + WAL) / steps."
    )


if __name__ == "__main__":
    main()
