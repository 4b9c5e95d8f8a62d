"""What each phase patch costs a training step, alone and together (no assertions).

    python benchmarks/bench_patches.py                      # this tree, 6 processes
    python benchmarks/bench_patches.py --ref main~3         # this tree against a git ref, interleaved

The loop is ``bench_vs_upstream.py``'s tiny one: Linear(32,64)-ReLU-Linear(64,10), batch 32,
SGD with momentum, a shuffled DataLoader over in-memory tensors (``next()`` before the step,
``num_workers=0``), ``torch.set_num_threads(1)``.  Each process builds one phase clock and one
step tracker of the tree under test and runs rounds of adjacent blocks in random order:

* ``bare``: no patch, no ``trace_step``;
* one patch alone (dataloader, forward, backward, optimizer), outside and inside ``trace_step``;
* every patch together, outside (``off``) and inside (``on``) ``trace_step``;
* ``trace_step`` with no patch (the step context and its row on a real loop);
* ``TRACEML_DISABLED=1``: the public ``traceml.trace_step`` when traceml is off.

A figure is the training thread's CPU time (``time.thread_time_ns``: on a shared machine other
processes inflate wall time by far more than the µs measured here, CPU time much less): the
median over rounds of (block - ``bare`` block of the same round), µs per step, then the median
over processes.  Patches are installed through the tree's own
``install_torch_hooks`` and the ones not under test removed by name, so one script measures
both trees.  Two micro-loops follow: an empty ``with trace_step(): pass`` and the same with
traceml disabled, against ``contextlib.nullcontext()`` (µs per iteration).  Last, per call:
each patched call alone (``next()`` on a DataLoader between steps, a small model's forward,
``loss.backward()``, ``optimizer.step()`` inside a step), patched minus unpatched, the minimum
over 7 repeats of the CPU time of 2,000 calls: the patches' own cost per call, which the block
figures (tens of µs of noise on a loaded machine) cannot resolve.  The cost of a step with
every phase timed is the four calls plus the empty ``trace_step``.

With ``--ref REF`` the tree at REF (``git archive``) runs in every other process, interleaved
with this tree's, and the table shows both columns and their ratio.  With ``--pure`` this tree
also runs with ``TRACEML_PURE_PYTHON=1`` (the pure-Python reference instead of the C fast path
``traceml/runtime/_fastclock.c``, when that is built), interleaved too.
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

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import contextlib, json, os, random, statistics, sys, time
cfg = json.loads(sys.argv[1])
os.environ.pop("TRACEML_DISABLED", None)
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from traceml.runtime import patches
from traceml.runtime.hooks import install_torch_hooks, wrap_forward
from traceml.runtime.step import PhaseClock, StepTracker
from traceml.runtime.steprows import StepRows
from traceml.schema import STEP_REGION
from traceml.store import BoundedTable

torch.set_num_threads(1)
torch.manual_seed(0)
rng = random.Random(cfg["seed"])
STEPS = cfg["steps"]
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
n = 32 * (STEPS + 1)
data = TensorDataset(torch.randn(n, 32), torch.randint(0, 10, (n,)))
loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
loss_fn = nn.functional.cross_entropy
NULL = contextlib.nullcontext()

clock = PhaseClock()
# the step table the agent uses (its rows drained between blocks, as the sender would)
rows = StepRows(4096)
tracker = StepTracker(clock, rows, BoundedTable(STEP_REGION, 4096))

GROUPS = {
    "dataloader": ("DataLoader.__next__",),
    "backward": ("Tensor.backward", "torch.autograd.backward"),
    "optimizer": ("optimizer step pre-hook", "optimizer step post-hook"),
}


def install(which):
    names = install_torch_hooks(clock, h2d=False)
    keep = set()
    for g in which:
        keep.update(GROUPS.get(g, ()))
    for name in names:
        if name not in keep:
            patches.undo(name)
    names = [nm for nm in names if nm in keep]
    if "forward" in which:
        fw = wrap_forward(clock, model)
        if fw is not None:
            names.append(fw)
    return names


def block(ctx):
    it = iter(loader)
    perf = time.thread_time_ns  # the training thread's CPU time: what other processes do not inflate
    t0 = perf()
    for _ in range(STEPS):
        x, y = next(it)
        with ctx if ctx is not None else NULL:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    dt = (perf() - t0) / STEPS / 1e3
    rows.take_unsent()
    return dt


import traceml
os.environ["TRACEML_DISABLED"] = "1"
traceml.shutdown()
assert traceml.init() is None
DISABLED = traceml.trace_step(model)
os.environ.pop("TRACEML_DISABLED")

ALL = ("dataloader", "forward", "backward", "optimizer")
CONFIGS = [("bare", (), False)]
for g in ALL:
    CONFIGS += [(g + " off", (g,), False), (g + " on", (g,), True)]
CONFIGS += [("all off", ALL, False), ("all on", ALL, True), ("trace_step only", (), True), ("disabled", (), "disabled")]


def run(conf):
    label, which, traced = conf
    names = install(which) if which else []
    try:
        ctx = tracker if traced is True else DISABLED if traced == "disabled" else None
        return block(ctx)
    finally:
        for name in reversed(names):
            patches.undo(name)


for conf in CONFIGS:  # warm-up
    run(conf)
diffs = {c[0]: [0.0] for c in CONFIGS}
if cfg["rounds"]:
    diffs = {c[0]: [] for c in CONFIGS}
for _ in range(cfg["rounds"]):
    order = rng.sample(CONFIGS, len(CONFIGS))
    got = {c[0]: run(c) for c in order}
    for k, v in got.items():
        diffs[k].append(v - got["bare"])
out = {k: statistics.median(v) for k, v in diffs.items()}
bare = [0.0]
out["bare step"] = statistics.median([run(CONFIGS[0]) for _ in range(3)])


def micro(ctx, n=20000):
    perf = time.thread_time_ns
    best = None
    for _ in range(5):
        t0 = perf()
        for _ in range(n):
            with ctx:
                pass
        dt = (perf() - t0) / n / 1e3
        rows.take_unsent()
        best = dt if best is None else min(best, dt)
    return best


null = micro(NULL)
out["empty trace_step"] = micro(tracker) - null
out["empty disabled"] = micro(DISABLED) - null


# -- per call: each patched call alone, patched against unpatched, min over repeats of the
# training thread's CPU time (stable on a loaded machine, unlike whole blocks)
def per_call(fn, n=2000):
    cpu = time.thread_time_ns
    best = None
    for _ in range(7):
        t0 = cpu()
        for _ in range(n):
            fn()
        dt = (cpu() - t0) / n / 1e3
        best = dt if best is None else min(best, dt)
    return best


small = nn.Linear(8, 4)
x8 = torch.randn(2, 8)
sgd = torch.optim.SGD(small.parameters(), lr=0.01)
for p_ in small.parameters():
    p_.grad = torch.zeros_like(p_)
fetch_data = TensorDataset(torch.randn(10**6, 2))
fetch_loader = DataLoader(fetch_data, batch_size=1)
fetch_it = [iter(fetch_loader)]


def fetch():
    next(fetch_it[0])


x32 = torch.randn(2, 32)


def fwd():
    model(x32)  # the model install() wraps


def bwd():
    small(x8).sum().backward()


CALLS = [("dataloader", fetch, False), ("forward", fwd, True), ("backward", bwd, True), ("optimizer", sgd.step, True)]
for name, fn, in_step in CALLS:
    base = per_call(fn)
    names = install((name,))
    try:
        if in_step:
            tracker.__enter__()
        try:
            patched = per_call(fn)
        finally:
            if in_step:
                tracker.__exit__(None, None, None)
    finally:
        for nm in reversed(names):
            patches.undo(nm)
    out[f"call {name}"] = patched - base
import traceml.runtime.step as _step
out["where"] = traceml.__file__
out["fast"] = getattr(_step, "FAST", None) is not None
print(json.dumps(out))
"""

ROWS = [
    ("dataloader off", "DataLoader.__next__ alone, outside trace_step"),
    ("dataloader on", "DataLoader.__next__ alone, inside trace_step"),
    ("forward off", "forward wrapper alone, outside"),
    ("forward on", "forward wrapper alone, inside"),
    ("backward off", "backward patch(es) alone, outside"),
    ("backward on", "backward patch(es) alone, inside"),
    ("optimizer off", "optimizer hooks alone, outside"),
    ("optimizer on", "optimizer hooks alone, inside"),
    ("trace_step only", "trace_step, no patch"),
    ("all off", "all patches, outside trace_step"),
    ("all on", "all patches + trace_step (every phase timed)"),
    ("disabled", "TRACEML_DISABLED=1, traceml.trace_step"),
    ("call dataloader", "per call: next() on a DataLoader, patched, between steps (carried)"),
    ("call forward", "per call: the traced model's forward, in a step"),
    ("call backward", "per call: loss.backward(), in a step"),
    ("call optimizer", "per call: optimizer.step(), in a step"),
    ("empty trace_step", "empty `with trace_step(): pass` (micro)"),
    ("empty disabled", "empty, TRACEML_DISABLED=1 (micro)"),
    ("bare step", "the bare tiny step itself"),
]


def tree_of(ref: str, work: Path) -> Path:
    dest = work / "ref"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", ref, "traceml"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=6, help="processes per tree")
    p.add_argument("--rounds", type=int, default=15, help="rounds of blocks (0: the per-call figures only)")
    p.add_argument("--steps", type=int, default=150, help="steps per block")
    p.add_argument("--ref", help="also measure the tree at this git ref, interleaved")
    p.add_argument("--pure", action="store_true", help="also this tree with TRACEML_PURE_PYTHON=1, interleaved")
    args = p.parse_args()
    fast = next((ROOT / "traceml" / "runtime").glob("_fastclock*.so"), None) is not None
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": ROOT}
        if args.pure:
            trees["pure Python"] = ROOT
        if args.ref:
            trees[args.ref] = tree_of(args.ref, Path(tmp))
        results: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
        for i in range(args.procs):
            for label, path in trees.items():
                cfg = {"seed": i, "rounds": args.rounds, "steps": args.steps}
                env = {**os.environ, "PYTHONPATH": str(path)}
                env = {k: v for k, v in env.items() if not k.startswith("TRACEML_")}
                if label == "pure Python":
                    env["TRACEML_PURE_PYTHON"] = "1"
                # cwd = the tree: `python -c` puts the working folder first on sys.path, so run from
                # this checkout every child imported this tree's traceml whatever PYTHONPATH said
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, capture_output=True, text=True, cwd=path
                )
                if proc.returncode != 0:
                    sys.exit(f"{label}: child failed:\n{proc.stderr[-3000:]}")
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                if not got.pop("where").startswith(str(path)) or got.pop("fast") != (label == "this tree" and fast):
                    sys.exit(f"{label}: the child imported the wrong traceml or implementation: {proc.stdout[-500:]}")
                results[label].append(got)
                print(f"  process {i + 1}/{args.procs} ({label}) done", file=sys.stderr)
    labels = list(trees)
    head = "| what | " + " | ".join(f"{lab} CPU µs/step" for lab in labels)
    head += "".join(f" | {lab} / this tree" for lab in labels[1:])
    print(
        f"\ntiny loop, {args.procs} processes x {args.rounds} rounds x {args.steps} steps per block; "
        "training-thread CPU µs per step, median over rounds of (block - bare), then over processes\n"
    )
    print(head + " |")
    print("|---|" + "---|" * (2 * len(labels) - 1))
    for key, what in ROWS:
        vals = [statistics.median(r[key] for r in results[lab]) for lab in labels]
        line = f"| {what} | " + " | ".join(f"{v:+.2f}" if key != "bare step" else f"{v:.1f}" for v in vals)
        for v in vals[1:]:
            line += f" | {v / vals[0]:.1f}x" if vals[0] > 0.05 else " | -"
        print(line + " |")


if __name__ == "__main__":
    main()
