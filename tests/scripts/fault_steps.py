"""A torch-free rank for the fault and scale tests: ``trace_step`` in a paced loop.

Run under ``traceml run`` (one process per rank) or started by hand with the ``TRACEML_*`` and
torchrun variables set.  Each step also does one step of plain-Python SGD on a tiny linear
regression, so that the run ends with a deterministic ``final loss <repr>`` (the same with
traceml or without, whatever happens to the aggregator), then ``done rank=R steps=N seconds=S``.

    --steps N            steps to run (default 100)
    --rate R             steps per second (0: as fast as possible); steps go in bursts of --burst
    --regions K          K ``trace_time`` regions per step (K more rows per step in step_region)
    --kill-rank R        this rank SIGKILLs itself ...
    --kill-at K          ... at step K, after printing ``sigkill rank=R step=K ns=<time.time_ns()>``
    --capacity C         rows kept per rank table (a small value makes the rank drop rows, counted)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import traceml


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--burst", type=int, default=10)
    p.add_argument("--regions", type=int, default=0)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--capacity", type=int, default=0)
    args = p.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    if args.capacity:
        _start_small_agent(args.capacity)
    names = [f"region{i}" for i in range(args.regions)]
    burst = max(1, args.burst)
    period = burst / args.rate if args.rate > 0 else 0.0
    next_burst = started = time.monotonic()
    w, b, loss = 0.0, 0.0, 0.0
    for step in range(args.steps):
        if rank == args.kill_rank and step == args.kill_at:
            print(f"sigkill rank={rank} step={step} ns={time.time_ns()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        with traceml.trace_step():
            for name in names:
                with traceml.trace_time(name):
                    pass
            w, b, loss = _sgd_step(w, b, step)
        if period and step % burst == burst - 1:
            next_burst += period
            delay = next_burst - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    print(f"final loss {loss!r}", flush=True)
    print(f"done rank={rank} steps={args.steps} seconds={time.monotonic() - started:.3f}", flush=True)
    return 0


def _sgd_step(w: float, b: float, step: int) -> tuple[float, float, float]:
    """One SGD step on y = 3x + 1 over a fixed batch of 8 points; returns (w, b, loss)."""
    xs = [((step * 8 + i) % 17) / 17.0 for i in range(8)]
    errors = [w * x + b - (3.0 * x + 1.0) for x in xs]
    loss = sum(e * e for e in errors) / len(errors)
    w -= 0.1 * sum(2 * e * x for e, x in zip(errors, xs, strict=True)) / len(xs)
    b -= 0.1 * sum(2 * e for e in errors) / len(xs)
    return w, b, loss


def _start_small_agent(capacity: int) -> None:
    """Start the agent with ``capacity`` rows per table, so that a fast loop overruns the sender."""
    from traceml.config import rank_config_from_env
    from traceml.runtime import api
    from traceml.runtime.agent import TABLE_CAPACITY, Agent

    agent = Agent(rank_config_from_env(), capacity=dict.fromkeys(TABLE_CAPACITY, capacity))
    # the sender only drains on its period: a half-full table no longer wakes it, so a loop faster
    # than capacity / period really overruns the tables (a quiet machine's sender kept up otherwise)
    for table in agent.tables.values():
        table.on_high_water = None
    api._agent = agent  # the documented one-agent-per-process slot; shutdown() closes it


if __name__ == "__main__":
    sys.exit(main())
