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

from traceml.cli.run_cmd import free_port

SCRIPT = """\
import torch, traceml
model = torch.nn.Linear(8, 8)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range({steps}):
    with traceml.trace_step(model):
        loss = model(torch.randn(4, 8)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
print("ok")
"""


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{cmd[:4]}... failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    traceml = str(Path(sys.executable).parent / "traceml")
    plain_s: list[float] = []
    traced_s: list[float] = []
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
                (plain_s if name == "plain" else traced_s).append(timed(cmd, work))
    diffs = [t - q for t, q in zip(traced_s, plain_s, strict=True)]
    print()
    print(f"traceml run vs plain torchrun: {args.nproc} rank(s), {args.steps} steps, {args.rounds} interleaved rounds")
    print(f"{'':<22}{'median s':>10}{'min s':>10}{'max s':>10}")
    print("-" * 52)
    for name, xs in (("plain torchrun", plain_s), ("traceml run", traced_s)):
        print(f"{name:<22}{statistics.median(xs):>10.2f}{min(xs):>10.2f}{max(xs):>10.2f}")
    print(f"{'difference per round':<22}{statistics.median(diffs):>10.2f}{min(diffs):>10.2f}{max(diffs):>10.2f}")
    print(f"fixed cost (median of differences): {statistics.median(diffs):+.2f} s (target <= 2 s)")


if __name__ == "__main__":
    main()
