"""Where a traced step's cost lands: each statement of the tiny loop timed on its own (no assertions; prints a table).

    python benchmarks/bench_step_segments.py                 # 3 processes x 30 rounds
    python benchmarks/bench_step_segments.py --procs 6 --rounds 40

Each process runs under ``traceml run --ui none`` (its aggregator, sender, sampler and stack
threads, as in ``bench_vs_upstream.py``), stops the traceml that ``traceml run`` started, and
starts it again with ``traceml.init()`` after noting the patchable state of torch (``torch_patch_state.py``, as
``bench_vs_upstream.py`` does).  The loop is ``bench_vs_upstream.py``'s tiny one
(Linear(32,64)-ReLU-Linear(64,10), batch 32, SGD with momentum, a shuffled in-memory DataLoader,
``torch.set_num_threads(1)``), and every statement of a step is timed with ``perf_counter_ns``:
``next(it)``, ``trace_step(model)`` with its ``__enter__``, the forward, the loss, ``backward()``,
``opt.step()``, ``opt.zero_grad()`` and ``__exit__``.  Four kinds of blocks of ``--steps`` steps
run in a random order in every round:

* ``bare``: traceml's patches taken out (its threads still run), a null context;
* ``off``: the patches in, a null context (no step open: the wrappers pass through);
* ``on``: the patches in, ``traceml.trace_step(model)`` (every phase timed);
* ``pass``: as ``on``, but the wrappers pass through inside the step (the clock's gate closed
  between ``__enter__`` and ``__exit__``): what the step context costs the calls around it.

A block's figure for a statement is its median over the block's steps (the constant part: rare
steps such as stack samples and memory reads are left out); the table gives the bare block's
figure and each kind's difference to the bare block of the same round, median over rounds, then
over processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SEGMENTS = ("next(it)", "trace_step + enter", "model(x)", "loss", "backward()", "opt.step()", "zero_grad()", "exit")
KINDS = ("bare", "off", "on", "pass")

CHILD = r"""
import contextlib, json, random, statistics, sys, time
cfg = json.loads(sys.argv[1])
import traceml
traceml.shutdown()  # `traceml run` started it: start it again below, once torch's state is noted
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from traceml.runtime import api

torch.set_num_threads(1)
torch.manual_seed(0)
steps = cfg["steps"]
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
n = 32 * (steps + 1)
data = TensorDataset(torch.randn(n, 32), torch.randint(0, 10, (n,)))
loader = DataLoader(data, batch_size=32, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
NULL = contextlib.nullcontext()
sys.path.insert(0, cfg["bench_dir"])
from torch_patch_state import apply, capture, changed, owners

OWNERS = owners([model])


P = time.perf_counter_ns


def block(kind):
    it, ce = iter(loader), nn.functional.cross_entropy
    traced = kind in ("on", "pass")
    clock = api._agent.clock if kind == "pass" else None
    segs = [[] for _ in range(8)]
    for _ in range(steps):
        t0 = P()
        x, y = next(it)
        t1 = P()
        cm = traceml.trace_step(model) if traced else NULL
        cm.__enter__()
        if clock is not None:
            gate, clock.gate = clock.gate, 0  # the wrappers pass through
        t2 = P()
        out = model(x)
        t3 = P()
        loss = ce(out, y)
        t4 = P()
        loss.backward()
        t5 = P()
        opt.step()
        t6 = P()
        opt.zero_grad()
        if clock is not None:
            clock.gate = gate
        t7 = P()
        cm.__exit__(None, None, None)
        t8 = P()
        for j, d in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7)):
            segs[j].append(d)
    return [statistics.median(s) for s in segs]


before = capture(OWNERS)
if traceml.init() is None:
    raise SystemExit("traceml.init() did not start an agent")
for _ in range(2):  # first-call costs, untimed
    for kind in ("on", "off", "pass"):
        block(kind)
patched = capture(OWNERS)
keys = changed(before, patched)
state, res = "patched", {k: [] for k in cfg["kinds"]}
rng = random.Random(cfg["seed"])
for _ in range(cfg["rounds"]):
    for kind in rng.sample(cfg["kinds"], len(cfg["kinds"])):
        want = "bare" if kind == "bare" else "patched"
        if want != state:
            apply(before if want == "bare" else patched, keys, patched if want == "bare" else before)
            state = want
        res[kind].append(block(kind))
if state != "patched":
    apply(patched, keys, before)
with open(cfg["result"], "w") as f:
    json.dump(res, f)
"""


def run_process(traceml_bin: str, cfg: dict[str, object], tmp: Path, i: int) -> dict[str, list[list[float]]]:
    script, result = tmp / "segments_child.py", tmp / f"result{i}.json"
    script.write_text(CHILD)
    cfg = {**cfg, "result": str(result), "seed": i, "bench_dir": str(Path(__file__).resolve().parent)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
    cmd = [
        traceml_bin,
        "run",
        "--ui",
        "none",
        "--overwrite",
        "--out",
        str(tmp / f"run{i}.tml"),
        str(script),
        json.dumps(cfg),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 or not result.exists():
        raise SystemExit(f"process {i} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=3, help="processes (default 3)")
    p.add_argument("--rounds", type=int, default=30, help="rounds of the four blocks per process (default 30)")
    p.add_argument("--steps", type=int, default=200, help="steps per block (default 200)")
    args = p.parse_args()
    traceml_bin = str(Path(sys.executable).parent / "traceml")
    cfg = {"steps": args.steps, "rounds": args.rounds, "kinds": list(KINDS)}
    per_proc = []
    with tempfile.TemporaryDirectory(prefix="traceml-segments-") as d:
        for i in range(args.procs):
            res = run_process(traceml_bin, cfg, Path(d), i)
            est = {"bare": [statistics.median(b[j] for b in res["bare"]) for j in range(len(SEGMENTS))]}
            for kind in KINDS[1:]:
                est[kind] = [
                    statistics.median(o[j] - b[j] for o, b in zip(res[kind], res["bare"], strict=True))
                    for j in range(len(SEGMENTS))
                ]
            per_proc.append(est)
            print(f"process {i + 1}/{args.procs}: on - bare {sum(est['on']) / 1e3:+.2f} µs per step", flush=True)
    print(f"\n{args.procs} processes x {args.rounds} rounds x {args.steps}-step blocks; ns per step, median over a")
    print("block's steps, then over rounds of (kind - bare block of the round), then over processes\n")
    head = f"{'statement':22s} {'bare':>9s} {'off - bare':>11s} {'on - bare':>10s} {'pass - bare':>12s}"
    print(head)
    print("-" * len(head))
    totals = dict.fromkeys(KINDS, 0.0)
    for j, name in enumerate(SEGMENTS):
        cells = {kind: statistics.median(e[kind][j] for e in per_proc) for kind in KINDS}
        for kind in KINDS:
            totals[kind] += cells[kind]
        print(f"{name:22s} {cells['bare']:9.0f} {cells['off']:+11.0f} {cells['on']:+10.0f} {cells['pass']:+12.0f}")
    print("-" * len(head))
    print(f"{'sum':22s} {totals['bare']:9.0f} {totals['off']:+11.0f} {totals['on']:+10.0f} {totals['pass']:+12.0f}")


if __name__ == "__main__":
    main()
