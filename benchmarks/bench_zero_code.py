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

2. The stack sampler: a :class:`StackSampler` at each rate samples this process's main thread
   (running the loop above inside its steps) for ``--seconds``, first with the native timer (each
   sample a pending call the training thread runs: its time on the training thread), then with the
   sampler's own thread reading the frames (``native=False``: what a training thread that is not the
   main thread gets; its thread's CPU); then the same loop in blocks with each sampler and without,
   in a random order: the training thread's CPU per step over the block without a sampler.
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


def _train_block(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> int:
    """``n`` traced steps on this thread; the training thread's CPU ns they took."""
    c0 = time.thread_time_ns()
    for _ in range(n):
        with traceml.trace_step(model):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return time.thread_time_ns() - c0


def _sampler(agent: object, mode: str, hz: float) -> StackSampler:
    rows: list[tuple[object, ...]] = []
    s = StackSampler(agent.clock, agent.tracker, rows.append, hz=hz, native=mode == "native")  # type: ignore[attr-defined]
    s.start()
    assert s.native == (mode == "native"), (mode, s.native)
    return s


def sampler_cost(rates: list[float], seconds: float, rounds: int, steps: int) -> None:
    """The stack sampler on the main training thread: the native timer (each sample a pending call
    the training thread runs) against the sampler's own thread reading the frames (``native=False``,
    what a training thread that is not the main thread gets).  Per sample, and per step in blocks
    of ``steps`` interleaved with blocks without a sampler (training-thread CPU)."""
    traceml.shutdown()
    agent = traceml.init()
    assert agent is not None
    agent.clock.owner = threading.get_ident()
    model, opt, x, y = make()
    _train_block(model, opt, x, y, 200)
    print(f"\nstack sampler per sample ({seconds:.0f} s per rate and mode, training on the main thread)")
    print(
        f"{'mode':<8} {'rate Hz':>8} {'samples':>8} {'training µs/sample':>19} {'thread µs/sample':>17} {'% of one core':>14}"
    )
    for mode in ("native", "thread"):
        for hz in rates:
            s = _sampler(agent, mode, hz)
            w0 = time.perf_counter()
            n = 0
            while time.perf_counter() - w0 < seconds:
                _train_block(model, opt, x, y, 100)
                n += 100
            s.stop()
            wall = time.perf_counter() - w0
            k = max(s.samples, 1)
            on_training, on_thread = s.native_ns / k / 1000, s.cpu_ns / k / 1000
            share = (s.native_ns + s.cpu_ns) / 1e9 / wall * 100
            print(f"{mode:<8} {hz:8.0f} {s.samples:8d} {on_training:19.1f} {on_thread:17.1f} {share:13.3f}%")
    print(
        f"\nstack sampler per step at {rates[1]:.0f} Hz, {rounds} rounds x {steps} steps in a random order "
        "(training-thread CPU, median of block - block without a sampler)"
    )
    kinds = ["none", "native", "thread"]
    per: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        order = kinds[:]
        random.shuffle(order)
        for kind in order:
            s = _sampler(agent, kind, rates[1]) if kind != "none" else None
            per[kind].append(_train_block(model, opt, x, y, steps) / steps / 1000)
            if s is not None:
                s.stop()
    base = statistics.median(per["none"])
    print(f"{'sampler':<8} {'µs/step':>9} {'vs none':>9}")
    print(f"{'none':<8} {base:9.1f}")
    for kind in kinds[1:]:
        d = statistics.median([a - b for a, b in zip(per[kind], per["none"], strict=True)])
        print(f"{kind:<8} {base + d:9.1f} {d:+9.2f}")
    traceml.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--part", choices=("all", "steps", "sampler"), default="all", help="which tables to print")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    if args.part in ("all", "steps"):
        per_step(args.rounds, args.steps)
    if args.part in ("all", "sampler"):
        sampler_cost([50.0, 67.0, 100.0], args.seconds, args.rounds, args.steps)


if __name__ == "__main__":
    main()
