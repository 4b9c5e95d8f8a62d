"""Fixed cost of ``traceml run`` over plain torchrun on the same tiny script.

    python benchmarks/bench_run_fixed_cost.py                 # 5 rounds, 1 rank
    python benchmarks/bench_run_fixed_cost.py --rounds 7 --nproc 2

Each round runs, in alternating order, ``python -m torch.distributed.run --nproc-per-node N
SCRIPT`` and ``traceml run --ui none --nproc-per-node N SCRIPT`` (recording to a temporary
directory), timing each from spawn to exit.  The script imports torch and runs a few traced
steps, so both sides pay the same torch start-up; the difference is what traceml adds: its CLI,
the aggregator (started in parallel), the rank agent, and closing the recording.  Prints the
median, min and max of each and the median of the per-round differences.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from traceml.cli.launch_plan import free_port

SCRIPT = """\
import torch, traceml
print("start", flush=True)
model = torch.nn.Linear(8, 8)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range({steps}):
    with traceml.trace_step(model):
        loss = model(torch.randn(4, 8)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
print("ok", flush=True)
"""


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, float]:
    """(total, head, tail) seconds: spawn -> exit, spawn -> the script's "start" line (after
    ``import torch``), and the script's "ok" line -> exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen: dict[str, float] = {}
    for line in proc.stdout:
        seen.setdefault(line.strip(), time.perf_counter())
    err = proc.stderr.read() if proc.stderr is not None else ""
    proc.wait()
    end = time.perf_counter()
    if proc.returncode != 0 or "start" not in seen or "ok" not in seen:
        raise SystemExit(f"{cmd[:4]}... failed ({proc.returncode}):\n{err[-2000:]}")
    return end - start, seen["start"] - start, end - seen["ok"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    traceml = str(Path(sys.executable).parent / "traceml")
    results: dict[str, list[tuple[float, float, float]]] = {"plain": [], "traceml": []}
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        work = Path(tmp)
        script = work / "tiny.py"
        script.write_text(SCRIPT.format(steps=args.steps))
        for i in range(args.rounds):
            # both sides get a fresh rendezvous port (traceml run picks one the same way)
            plain = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}"]
            plain += [f"--master-port={free_port()}", str(script)]
            out = work / f"r{i}" / "run.tml"
            traced = [
                traceml,
                "run",
                "--ui",
                "none",
                "--nproc-per-node",
                str(args.nproc),
                "--out",
                str(out),
                str(script),
            ]
            pair = [("plain", plain), ("traceml", traced)]
            for name, cmd in pair if i % 2 == 0 else pair[::-1]:  # alternate who goes first
                results[name].append(timed(cmd, work))
    print()
    print(f"traceml run vs plain torchrun: {args.nproc} rank(s), {args.steps} steps, {args.rounds} interleaved rounds")
    print("head = spawn -> the script's first line (after import torch); tail = its last line -> exit")
    print(f"{'seconds (median / min / max)':<30}{'total':>24}{'head':>24}{'tail':>24}")
    print("-" * 102)

    def cell(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} / {min(xs):.2f} / {max(xs):.2f}"

    for name, label in (("plain", "plain torchrun"), ("traceml", "traceml run")):
        cols = list(zip(*results[name], strict=True))
        print(f"{label:<30}" + "".join(f"{cell(list(c)):>24}" for c in cols))
    diffs = [[t[k] - q[k] for t, q in zip(results["traceml"], results["plain"], strict=True)] for k in range(3)]
    print(f"{'difference per round':<30}" + "".join(f"{cell(d):>24}" for d in diffs))
    print(
        f"fixed cost (median of per-round differences): total {statistics.median(diffs[0]):+.2f} s, "
        f"head {statistics.median(diffs[1]):+.2f} s, tail {statistics.median(diffs[2]):+.2f} s (target <= 2 s)"
    )


if __name__ == "__main__":
    main()
