"""What zero-code steps and the residual's stack sampler cost (no assertions; prints tables).

    python benchmarks/bench_zero_code.py            # 5 rounds of interleaved blocks

1. Per-step cost on a tiny CPU loop (Linear(32,64)-ReLU-Linear(64,10), batch 32, SGD,
   ``torch.set_num_threads(1)``), blocks of ``--steps`` iterations run in a random order in
   each round, in one process:

   * ``bare``: no traceml;
   * ``trace_step``: ``with traceml.trace_step(model):`` around the step (every patch on);
   * ``zero-code``: the same loop unmodified, ``traceml.init(auto_steps=True)``;

   a figure is the median over rounds of (block - ``bare`` block of the same round), µs per step.
   No sender runs (nothing leaves the process), so it is the training thread's own cost.

2. The stack sampler's CPU: a :class:`StackSampler` at each rate samples this process's training
   thread (running the loop above inside an open step) for ``--seconds``; its thread's CPU time
   over the wall time is the share of one core it takes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import traceml
from traceml.runtime import api
from traceml.runtime.stacks import StackSampler


def make() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, torch.randn(32, 32), torch.randint(0, 10, (32,))


def block(kind: str, steps: int) -> float:
    """µs per step of one block of ``kind``."""
    traceml.shutdown()
    if kind == "zero-code":
        traceml.init(auto_steps=True)
    elif kind == "trace_step":
        traceml.init()
    model, opt, x, y = make()
    loss_fn = torch.nn.functional.cross_entropy

    def one() -> None:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(20):  # warm-up (and, zero-code: the first optimizer step finds the model)
        one()
    t0 = time.perf_counter_ns()
    if kind == "trace_step":
        for _ in range(steps):
            with traceml.trace_step(model):
                one()
    else:
        for _ in range(steps):
            one()
    dt = time.perf_counter_ns() - t0
    agent = api._agent
    if kind != "bare" and agent is not None:
        assert agent.tables["step_time"].appended >= steps - 1, (kind, agent.tables["step_time"].appended)
    traceml.shutdown()
    return dt / steps / 1000


def per_step(rounds: int, steps: int) -> None:
    kinds = ["bare", "trace_step", "zero-code"]
    deltas: dict[str, list[float]] = {k: [] for k in kinds[1:]}
    bare: list[float] = []
    for _ in range(rounds):
        order = kinds[:]
        random.shuffle(order)
        res = {k: block(k, steps) for k in order}
        bare.append(res["bare"])
        for k in kinds[1:]:
            deltas[k].append(res[k] - res["bare"])
    print(f"\nper-step cost, {rounds} rounds x {steps} steps (median of block - bare block of the same round)")
    print(f"{'mode':<12} {'µs/step':>9} {'vs bare':>9}")
    b = statistics.median(bare)
    print(f"{'bare':<12} {b:9.1f} {'':>9}")
    for k, d in deltas.items():
        m = statistics.median(d)
        print(f"{k:<12} {b + m:9.1f} {m:+8.1f}  ({m / b * 100:+.1f}%)")


def sampler_cpu(rates: list[float], seconds: float) -> None:
    traceml.shutdown()
    agent = traceml.init()
    assert agent is not None
    model, opt, x, y = make()
    stop = threading.Event()

    def train() -> None:
        agent.clock.owner = threading.get_ident()
        while not stop.is_set():
            with traceml.trace_step(model):
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()

    t = threading.Thread(target=train)
    t.start()
    print(f"\nstack sampler CPU ({seconds:.0f} s per rate, sampling a training thread in its steps)")
    print(f"{'rate Hz':>8} {'samples':>8} {'µs/sample':>10} {'% of one core':>14}")
    try:
        time.sleep(0.5)
        for hz in rates:
            rows: list[tuple[object, ...]] = []
            s = StackSampler(agent.clock, agent.tracker, rows.append, hz=hz)
            w0 = time.perf_counter()
            s.start()
            time.sleep(seconds)
            s.stop()
            wall = time.perf_counter() - w0
            per = s.cpu_ns / max(s.samples, 1) / 1000
            print(f"{hz:8.0f} {s.samples:8d} {per:10.1f} {s.cpu_ns / 1e9 / wall * 100:13.3f}%")
    finally:
        stop.set()
        t.join()
        traceml.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    per_step(args.rounds, args.steps)
    sampler_cpu([50.0, 67.0, 100.0], args.seconds)


if __name__ == "__main__":
    main()
