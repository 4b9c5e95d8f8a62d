"""What ``trace_step`` costs a training step, and how fast the sender ships rows (no assertions).

    .venv/bin/python benchmarks/bench_step_overhead.py [--steps 250] [--rounds 20] [--device cpu|cuda]

Part 1, the brief's loop: an MLP 512-512-10, batch 64, ``torch.set_num_threads(1)``, a
DataLoader over an in-memory TensorDataset, SGD (with ``--device cuda`` the batch is copied
to the GPU inside the step).  Three modes run interleaved in short blocks, round after round
(bare; ``trace_step`` recording in memory; ``trace_step`` streaming to a live TelemetryServer
in a separate process), so that load on the machine hits all modes alike.  Overhead = the
median over rounds of (mode - bare) in the same round; "best" = fastest block of each mode.

Part 2, the hot path alone: a step of tiny ops (``next()`` on a DataLoader iterator, a 4x4
forward, backward, optimizer step) where the training work is small, so the fixed cost of
the patches and the step row shows up clearly; and an empty ``with trace_step(model): pass``.

Part 3, the sender: rows/s that one flush takes from the step table, encodes and writes to
the TelemetryServer over loopback (until the server has them all).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import traceml
from traceml.config import RankConfig
from traceml.runtime.agent import Agent
from traceml.transport import RankIdentity

TOKEN = "bench-token"

SERVER = r"""
import sys, threading
from traceml.transport import BaseHandler, TelemetryServer, batch_rows
class Count(BaseHandler):
    def __init__(self):
        self.rows = 0
        self.lock = threading.Lock()
    def on_message(self, conn, msg):
        n = sum(batch_rows(msg).values())
        with self.lock:
            self.rows += n
h = Count()
srv = TelemetryServer("127.0.0.1", 0, token=sys.argv[1], handler=h).start()
print(srv.port, flush=True)
for line in sys.stdin:  # "?" -> rows received so far; EOF -> stop
    with h.lock:
        print(h.rows, flush=True)
srv.stop()
"""


class ServerProcess:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, TOKEN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def rows(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def set_env(port: int | None) -> None:
    for k in [k for k in os.environ if k.startswith("TRACEML_")]:
        del os.environ[k]
    if port is not None:
        os.environ.update({"TRACEML_AGGREGATOR_PORT": str(port), "TRACEML_TOKEN": TOKEN, "TRACEML_RUN_ID": "bench"})


# --- part 1: the MLP loop -------------------------------------------------------------------


def make_mlp_loop(steps: int, device: str) -> Callable[[bool], float]:
    torch.manual_seed(0)
    dev = torch.device(device)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.randn(64 * 256, 512), torch.randint(0, 10, (64 * 256,)))
    loader = DataLoader(data, batch_size=64, shuffle=True, pin_memory=dev.type == "cuda")
    loss_fn = torch.nn.functional.cross_entropy
    on_gpu = dev.type == "cuda"
    batches: Any = iter(())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if on_gpu:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def run(traced: bool) -> float:
        nonlocal batches
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        for _ in range(steps):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            if traced:
                with traceml.trace_step(model):
                    step(x, y)
            else:
                step(x, y)
        if on_gpu:
            torch.cuda.synchronize()
        return (time.perf_counter_ns() - t0) / steps / 1000.0

    return run


# --- part 2: tiny steps ---------------------------------------------------------------------


def make_tiny_loop(steps: int) -> Callable[[bool], float]:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(torch.randn(steps, 4)), batch_size=None)
    x0 = torch.randn(1, 4)

    def run(traced: bool) -> float:
        it = iter(loader)
        t0 = time.perf_counter_ns()
        for _ in range(steps):
            next(it)
            if traced:
                with traceml.trace_step(model):
                    model(x0).sum().backward()
                    opt.step()
            else:
                model(x0).sum().backward()
                opt.step()
        return (time.perf_counter_ns() - t0) / steps / 1000.0

    return run


def make_empty_loop(steps: int) -> Callable[[bool], float]:
    model = torch.nn.Linear(4, 4)

    def run(traced: bool) -> float:
        t0 = time.perf_counter_ns()
        if traced:
            for _ in range(steps):
                with traceml.trace_step(model):
                    pass
        else:
            for _ in range(steps):
                pass
        return (time.perf_counter_ns() - t0) / steps / 1000.0

    return run


def rounds(run: Callable[[bool], float], n_rounds: int, server: ServerProcess) -> dict[str, list[float]]:
    """Interleave the modes in every round; traceml is started/stopped outside the timing."""
    out: dict[str, list[float]] = {"bare": [], "trace_step": [], "trace_step + stream": []}
    run(False)  # warm-up
    for _ in range(n_rounds):
        set_env(None)
        out["bare"].append(run(False))
        traceml.init()
        out["trace_step"].append(run(True))
        traceml.shutdown()
        set_env(server.port)
        traceml.init()
        out["trace_step + stream"].append(run(True))
        traceml.shutdown()
    set_env(None)
    return out


def print_table(title: str, results: dict[str, list[float]]) -> None:
    bare = statistics.median(results["bare"])
    best_bare = min(results["bare"])
    print(f"\n{title}")
    print(f"{'mode':<22}{'µs/step':>10}{'overhead µs':>13}{'overhead %':>12}{'best µs':>10}{'best over µs':>14}")
    for mode, values in results.items():
        med = statistics.median(values)
        over = statistics.median(v - b for v, b in zip(values, results["bare"], strict=True))
        best = min(values)
        print(f"{mode:<22}{med:>10.1f}{over:>13.1f}{100.0 * over / bare:>11.2f}%{best:>10.1f}{best - best_bare:>14.1f}")


def cuda_costs(n: int = 20000) -> None:
    """What the CUDA pieces of a traced step cost on the training thread, per call."""
    from traceml.runtime.cuda import cuda_recorder

    dev = torch.cuda.current_device()
    ev = torch.cuda.Event(enable_timing=True)
    fast = cuda_recorder(torch, dev)

    def per_call(fn: Callable[[], Any]) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter_ns() - t0) / n / 1000.0)
        return best

    c = torch._C
    items: list[tuple[str, Callable[[], Any]]] = [
        ("torch.cuda.is_initialized()", torch.cuda.is_initialized),
        ("Event.record() (current_stream())", ev.record),
        ("fast record (cached stream)", (lambda: fast(ev)) if fast is not None else ev.record),
        ("Event.query()", ev.query),
        ("reset_peak_memory_stats()", lambda: torch.cuda.reset_peak_memory_stats(dev)),
        (
            "max_memory_allocated+reserved()",
            lambda: (torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)),
        ),
        ("C _cuda_resetPeakMemoryStats", lambda: c._cuda_resetPeakMemoryStats(dev)),
        ("C _cuda_memoryStats (both peaks)", lambda: c._cuda_memoryStats(dev)),
    ]
    print("\nCUDA pieces on the training thread (best of 5, µs per call)")
    for name, fn in items:
        print(f"{name:<40}{per_call(fn):>8.2f}")


# --- part 3: sender throughput --------------------------------------------------------------


def sender_throughput(server: ServerProcess, sizes: list[int]) -> None:
    print("\nsender: one flush of N step_time rows -> encode -> TelemetryServer over loopback")
    print(f"{'rows':>10}{'flush ms':>12}{'delivered ms':>14}{'rows/s':>14}")
    cfg = RankConfig(aggregator_host="127.0.0.1", aggregator_port=server.port, token=TOKEN, run_id="bench")
    for n in sizes:
        agent = Agent(
            cfg,
            start=False,
            identity=RankIdentity(host="bench", pid=os.getpid()),
            capacity={"step_time": n},
            stream_options={"buffer_messages": 1024},
        )
        try:
            assert agent.sender is not None
            agent.sender.flush()  # connect and say hello outside the timing
            base = server.rows()
            table = agent.tables["step_time"]
            for i in range(n):
                table.append((i, 1_700_000_000_000_000_000 + i, 0, 1000 + i % 7, 100, 0, 300, 500, 80, 20))
            t0 = time.perf_counter()
            agent.sender.flush()
            t1 = time.perf_counter()
            while server.rows() - base < n:
                time.sleep(0.001)
            t2 = time.perf_counter()
        finally:
            agent.close()
        print(f"{n:>10}{(t1 - t0) * 1e3:>12.1f}{(t2 - t0) * 1e3:>14.1f}{n / (t2 - t0):>14,.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250, help="steps per mode per round (MLP loop)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tiny-steps", type=int, default=2000, help="steps per mode per round (tiny loop)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the MLP loop only)")
    p.add_argument("--no-sender", action="store_true", help="skip part 3")
    args = p.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs "
        f"(load {load:.1f}), 1 torch thread, CUDA available: {torch.cuda.is_available()}"
    )
    server = ServerProcess()
    try:
        if args.device == "cuda":
            cuda_costs()
        mlp = rounds(make_mlp_loop(args.steps, args.device), args.rounds, server)
        print_table(
            f"MLP 512-512-10, batch 64, DataLoader, SGD on {args.device}: "
            f"{args.rounds} rounds x {args.steps} steps per mode",
            mlp,
        )
        tiny = rounds(make_tiny_loop(args.tiny_steps), args.rounds, server)
        print_table(
            f"tiny CPU step (next + 4x4 forward/backward/step): {args.rounds} rounds x {args.tiny_steps} steps",
            tiny,
        )
        empty = rounds(make_empty_loop(args.tiny_steps * 10), args.rounds, server)
        print_table(
            f"empty step (`with trace_step(model): pass`): {args.rounds} rounds x {args.tiny_steps * 10}", empty
        )
        if not args.no_sender:
            sender_throughput(server, [1_000, 10_000, 100_000])
    finally:
        server.close()


if __name__ == "__main__":
    main()
