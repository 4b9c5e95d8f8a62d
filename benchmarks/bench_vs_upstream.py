"""Overhead per step and bytes on disk: traceml against a bare loop and against upstream TraceML.

Two loops, selectable with ``--model tiny|mlp|both`` (default both, run in the same processes):

* ``tiny``  Linear(32,64)-ReLU-Linear(64,10), batch 32 -- a step of a few hundred µs, so a
  profiler's fixed cost per step shows up clearly;
* ``mlp``   MLP 512-512-512-10, batch 64 -- a step of a few ms.

Both use SGD (momentum 0.9), a DataLoader over in-memory tensors (``num_workers=0``, shuffled,
``next()`` inside the timed step) and ``torch.set_num_threads(1)``.  Three variants, each run in
``--procs`` short processes, all interleaved in random order:

* ``bare``      plain ``python loop.py`` in this venv, no profiler;
* ``traceml``   ``traceml run --ui none --out run.tml loop.py`` (this repo: aggregator, spool,
  recording); the loop first stops the traceml that ``traceml run`` started, so that it runs with no traceml
  at all, then calls ``traceml.shutdown(); traceml.init()`` (public API) to start it;
* ``upstream``  ``traceml run --mode summary loop.py`` of upstream ``traceml-ai`` from
  ``--upstream-venv`` (its aggregator and SQLite store; its executor starts its runtime
  threads before the script), the loop calling ``traceml.init(mode="auto")``.

Every process runs the same schedule of short timed blocks (each with a fresh DataLoader iterator):

1. ``pre``: ``--pre`` blocks per model before the profiler is started;
2. the switch (``init`` for the profilers, nothing for ``bare``) and one untimed block per model
   with and without ``trace_step`` (first-call costs); the loop then compares every attribute of
   the torch classes and modules a profiler may patch, torch's global hook registries and the
   traced models' own attributes with their state before the switch: what changed is the
   profiler's global patching (listed at the end of the output);
3. ``--rounds`` rounds per model of three adjacent blocks in random order: ``bare`` (the changed
   attributes set back to their pre-switch values: no patch, no ``trace_step``), ``off`` (the
   patches in, no ``trace_step``) and ``on`` (the patches in, ``with trace_step(model)``).  For
   the ``bare`` variant nothing changes: its rows are the null control of every estimate.

Estimates, per process then across processes (median, bootstrap 95 % CI resampling processes):

* ``on - bare``: median over rounds of the paired difference; the training thread's cost of
  turning the profiler on (its background threads run during both blocks);
* ``on - off``: what ``trace_step`` adds once the patches are in;
* ``off - bare``: what the global patches cost a step that is not inside ``trace_step``;
* ``bare - pre``: not paired in time (the profiler's threads, plus any drift within the process);
* ``on - bare procs``: each process's median ``on`` block against the ``bare`` processes' -- the
  cross-process estimate, which the spread between processes dominates on a shared VM.

A block's figure is its mean µs/step (the time training pays, periodic costs included); the
block's median step and the training thread's CPU time per step are reported too.
Bytes on disk per rank-step: the ``.tml`` file, or upstream's SQLite telemetry database
(``logs/<run>/aggregator/telemetry`` plus -wal/-shm), divided by the process's traced steps.

    python benchmarks/bench_vs_upstream.py                        # both loops, 12 processes per variant
    python benchmarks/bench_vs_upstream.py --model tiny --procs 20
    python benchmarks/bench_vs_upstream.py --variants bare,traceml  # without upstream
    python benchmarks/bench_vs_upstream.py --model tiny --make-upstream-venv /tmp/upstream-venv

``--make-upstream-venv DIR`` builds upstream's venv first when DIR has none (``python -m venv``,
a ``.pth`` to this venv's site-packages so that upstream uses the same torch, then
``pip install --no-deps traceml-ai==0.5.0 msgspec`` from PyPI) and runs against it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

LOOP = r"""
import contextlib, json, os, random, statistics, sys, time
cfg = json.loads(sys.argv[1])
if os.environ.pop("BENCH_START_OFF", None):
    # `traceml run` started traceml before this script: stop it, so the first blocks run without it
    import traceml
    traceml.shutdown()
if cfg["pin"] >= 0:  # the training thread only (the profilers' threads already exist and run anywhere)
    os.sched_setaffinity(0, {cfg["pin"]})
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
torch.manual_seed(0)
variant = cfg["variant"]
rng = random.Random(cfg["seed"])
NULL = contextlib.nullcontext()
trace = lambda model: NULL
loss_fn = nn.functional.cross_entropy


def build(name):
    if name == "tiny":
        model, dim, batch = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), 32, 32
    else:
        layers = [nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)]
        model, dim, batch = nn.Sequential(*layers), 512, 64
    steps = cfg["block"][name]
    n = batch * (steps + 1)  # one epoch covers a block: every block starts a fresh iterator
    data = TensorDataset(torch.randn(n, dim), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), loader, steps


def run_block(m, traced):
    model, opt, loader, steps = m
    it = iter(loader)  # upstream patches DataLoader.__iter__: only an iterator made now has its patch state
    perf, cpu = time.perf_counter_ns, time.thread_time_ns
    durs = [0] * steps
    c0 = cpu()
    t0 = last = perf()
    for i in range(steps):
        x, y = next(it)
        with trace(model) if traced else NULL:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        now = perf()
        durs[i] = now - last
        last = now
    return [(last - t0) / steps / 1e3, statistics.median(durs) / 1e3, (cpu() - c0) / steps / 1e3]


models = {name: build(name) for name in cfg["models"]}

# -- the global state a profiler may patch: attributes of these classes and modules, torch's
# global hook registries, and every traced module's own attributes and hook dicts
sys.path.insert(0, cfg["bench_dir"])
from torch_patch_state import apply, capture, changed as changed_keys, name_of, owners

OWNERS = owners([m[0] for m in models.values()])


blocks, traced_steps, state = [], 0, "bare"


def record(phase, name):
    global traced_steps, state
    want = "bare" if phase in ("pre", "bare") else "patched"
    if state != want and variant != "bare":
        apply(before if want == "bare" else patched, changed, patched if want == "bare" else before)
        state = want
    blocks.append([phase, name, *run_block(models[name], phase == "on")])
    traced_steps += models[name][3] if phase == "on" else 0


for m in models.values():  # warm-up (untimed)
    run_block(m, False)
for _ in range(cfg["pre"]):
    for name in rng.sample(list(models), len(models)):
        record("pre", name)
before = capture(OWNERS)
t_switch = time.perf_counter()
if variant == "traceml":
    import traceml
    os.environ.pop("TRACEML_DISABLED", None)
    traceml.shutdown()  # clears the "disabled" decision taken at start-up; init() then starts the agent
    if traceml.init() is None:
        raise SystemExit("traceml.init() did not start an agent")
    trace = traceml.trace_step
elif variant == "upstream":
    import traceml_ai
    traceml_ai.init(mode="auto")
    trace = traceml_ai.trace_step
switch_s = time.perf_counter() - t_switch
for m in models.values():  # first-call costs (forward wrapper, optimizer hooks, environment) untimed
    run_block(m, True)
    traced_steps += m[3]
    run_block(m, False)
patched = capture(OWNERS)
changed = changed_keys(before, patched)
state = "patched"
for _ in range(cfg["rounds"]):
    for name in rng.sample(list(models), len(models)):
        for phase in rng.sample(["bare", "off", "on"], 3):
            record(phase, name)
if state != "patched":
    apply(patched, changed, before)  # the profiler's own shutdown undoes its patches from here
with open(cfg["result"], "w") as f:
    json.dump({"blocks": blocks, "traced_steps": traced_steps, "switch_s": switch_s,
               "patched": sorted({name_of(*(patched.get(k) or before[k])[:2]) for k in changed})}, f)
"""

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
OURS = str(Path(sys.executable).parent / "traceml")
VARIANTS = ("bare", "traceml", "upstream")
#: what --make-upstream-venv installs (torch and numpy come from this venv through a .pth)
UPSTREAM_PACKAGES = ("traceml-ai==0.5.0", "msgspec")
MODELS = {
    "tiny": "Linear(32,64)-ReLU-Linear(64,10), batch 32",
    "mlp": "MLP 512-512-512-10, batch 64",
}
#: (column label, key of the per-process estimate)
ESTIMATES = (
    ("on - bare", "on_bare"),
    ("on - off", "on_off"),
    ("off - bare", "off_bare"),
    ("bare - pre", "bare_pre"),
)


def _env(variant: str) -> dict[str, str]:
    drop = ("TRACEML_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    if variant == "traceml":
        # the loop stops the traceml that `traceml run` started, measures its pre-init blocks, then
        # starts traceml itself (TRACEML_DISABLED would now turn `traceml run` itself off: --disable)
        env["BENCH_START_OFF"] = "1"
    return env


def run_process(variant: str, work: Path, loop: Path, cfg: dict[str, object], upstream_venv: Path, n: int) -> dict:
    run_dir = work / f"{variant}-{n}"
    run_dir.mkdir()
    result = run_dir / "result.json"
    arg = json.dumps({**cfg, "variant": variant, "result": str(result), "seed": n, "bench_dir": str(HERE)})
    if variant == "bare":
        cmd = [sys.executable, str(loop), arg]
    elif variant == "traceml":
        cmd = [OURS, "run", "--ui", "none", "--out", str(run_dir / "run.tml"), str(loop), arg]
    else:
        cmd = [str(upstream_venv / "bin" / "traceml"), "run", "--mode", "summary", "--logs-dir", str(run_dir / "logs")]
        cmd += ["--run-name", f"r{n}", "--no-dashboard-auto-open", str(loop), "--args", arg]
    load = os.getloadavg()[0]
    started = time.monotonic()
    res = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, env=_env(variant), timeout=1800)
    wall = time.monotonic() - started
    if res.returncode != 0 or not result.exists():
        raise SystemExit(f"{variant} run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out.update(variant=variant, wall_s=wall, load=load, disk_bytes=_disk_bytes(variant, run_dir, n))
    return out


def _disk_bytes(variant: str, run_dir: Path, n: int) -> int:
    if variant == "traceml":
        if not (run_dir / "run.tml").exists():  # debugging aid: where did the recording go?
            print(f"no run.tml in {run_dir}: {sorted(p.name for p in run_dir.rglob('*'))[:40]}", file=sys.stderr)
            for log in run_dir.rglob("*.log"):
                print(f"--- {log.name}:\n{log.read_text()[-1500:]}", file=sys.stderr)
        return (run_dir / "run.tml").stat().st_size
    if variant == "upstream":
        base = run_dir / "logs" / f"r{n}" / "aggregator" / "telemetry"
        return sum(
            p.stat().st_size
            for p in (base, base.with_name("telemetry-wal"), base.with_name("telemetry-shm"))
            if p.exists()
        )
    return 0


def make_upstream_venv(dest: Path) -> None:
    """Build upstream TraceML's venv at ``dest`` (kept when it already has upstream's ``traceml``)."""
    python = dest / "bin" / "python"
    if (dest / "bin" / "traceml").exists():
        print(f"upstream venv: {dest} already has traceml-ai; using it")
        return
    print(f"upstream venv: creating {dest} ({' '.join(UPSTREAM_PACKAGES)}; torch from this venv)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([str(python), "-c", where], check=True, capture_output=True, text=True).stdout.strip()
    # a path line, not an import: this venv's own .pth files (our editable traceml) stay unread there
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "bench_project_site.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    cmd = [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *UPSTREAM_PACKAGES]
    subprocess.run(cmd, check=True)
    check = [str(python), "-c", "import torch, traceml_ai; print(torch.__version__, traceml_ai.__file__)"]
    out = subprocess.run(check, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"upstream venv {dest}: the check failed:\n{out.stdout}{out.stderr}")
    print(f"upstream venv: ready (torch, traceml_ai: {out.stdout.strip()})")


# --- statistics --------------------------------------------------------------------------------

MEAN, MEDIAN, CPU = 2, 3, 4  # columns of a block: [phase, model, mean µs/step, median step µs, thread CPU µs/step]


def per_process(proc: dict, model: str, col: int) -> dict[str, float]:
    """One process's estimates for one model, from its blocks' column ``col``."""
    by: dict[str, list[float]] = {"pre": [], "bare": [], "off": [], "on": []}
    for phase, name, *vals in proc["blocks"]:
        if name == model:
            by[phase].append(vals[col - 2])
    med = {k: statistics.median(v) for k, v in by.items()}

    def paired(a: str, b: str) -> float:
        # each round records one block of every phase, adjacent in time: pair them by position
        return statistics.median(x - y for x, y in zip(by[a], by[b], strict=True))

    return {
        "on_bare": paired("on", "bare"),
        "on_off": paired("on", "off"),
        "off_bare": paired("off", "bare"),
        "bare_pre": med["bare"] - med["pre"],
        "step": med["on"],
    }


def bootstrap(
    groups: Sequence[Sequence[float]], stat: Callable[..., float], rng: random.Random, n: int
) -> tuple[float, float, float]:
    """``stat`` of the groups, and the 2.5/97.5 percentiles of ``stat`` over resamples of every group."""
    point = stat(*groups)
    draws = sorted(stat(*(rng.choices(g, k=len(g)) for g in groups)) for _ in range(n))
    return point, draws[int(0.025 * (n - 1))], draws[int(0.975 * (n - 1))]


def _diff_of_medians(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(a) - statistics.median(b)


def _ratio_of_medians(a: Sequence[float], b: Sequence[float]) -> float:
    den = statistics.median(b)
    return statistics.median(a) / den if den > 0 else float("inf")


def _fmt(ci: tuple[float, float, float], unit: str = "") -> str:
    point, lo, hi = ci
    return f"{point:+.1f} [{lo:+.1f}, {hi:+.1f}]{unit}"


def _fmt_ratio(ci: tuple[float, float, float]) -> str:
    point, lo, hi = ci

    def one(x: float) -> str:
        return "inf" if x == float("inf") else f"{x:.1f}"

    return f"{one(point)}x [{one(lo)}, {one(hi)}]"


def report(results: dict[str, list[dict]], model: str, cfg: dict, boot: int, rng: random.Random) -> None:
    variants = [v for v in VARIANTS if results.get(v)]
    loads = [p["load"] for v in variants for p in results[v]]
    print(f"\n== {model}: {MODELS[model]}")
    print(
        f"   {cfg['procs']} processes per variant, interleaved; each {cfg['pre']} pre-init blocks, then {cfg['rounds']} "
        f"rounds of bare/off/on blocks of {cfg['block'][model]} steps; load average (1 min) at process starts "
        f"{min(loads):.2f}-{max(loads):.2f} (median {statistics.median(loads):.2f}), {os.getloadavg()[0]:.2f} now, "
        f"{os.cpu_count()} CPUs"
    )
    views = ((MEAN, "block mean µs/step"), (MEDIAN, "block median step µs"), (CPU, "training-thread CPU µs/step"))
    for col, what in views:
        est = {v: [per_process(p, model, col) for p in results[v]] for v in variants}
        print(f"\n-- {what}: median over processes [bootstrap 95 % CI, resampling processes]")
        head = f"{'variant':9} {'on step':>8}" + "".join(f" {label:>23}" for label, _ in ESTIMATES)
        head += f" {'on - bare procs':>23}"
        print(head)
        print("-" * len(head))
        bare_steps = [e["step"] for e in est.get("bare", [])]
        for v in variants:
            cells = [_fmt(bootstrap([[e[k] for e in est[v]]], statistics.median, rng, boot)) for _, k in ESTIMATES]
            steps = [e["step"] for e in est[v]]
            xproc = _fmt(bootstrap([steps, bare_steps], _diff_of_medians, rng, boot)) if bare_steps else "-"
            print(f"{v:9} {statistics.median(steps):8.1f}" + "".join(f" {c:>23}" for c in cells) + f" {xproc:>23}")
        if "traceml" in est and "upstream" in est:
            for label, k in ESTIMATES[:2]:
                up, ours = [e[k] for e in est["upstream"]], [e[k] for e in est["traceml"]]
                r = bootstrap([up, ours], _ratio_of_medians, rng, boot)
                share = bootstrap([ours, up], _ratio_of_medians, rng, boot)
                print(
                    f"   ({label}) upstream / traceml: {_fmt_ratio(r)};  traceml / upstream: "
                    f"{share[0]:.3f} [{share[1]:.3f}, {share[2]:.3f}]"
                )
    for v in variants:
        if v == "bare":
            continue
        per_step = [p["disk_bytes"] / p["traced_steps"] for p in results[v]]
        switch = statistics.median(p["switch_s"] for p in results[v])
        print(
            f"   {v}: {statistics.median(per_step):.1f} B on disk per traced rank-step "
            f"({results[v][0]['traced_steps']} traced steps per process, all models); init() took {switch * 1e3:.0f} ms"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "mlp", "both"), default="both")
    p.add_argument("--procs", type=int, default=12, help="processes per variant (interleaved in random order)")
    p.add_argument("--pre", type=int, default=4, help="pre-init blocks per model and process")
    p.add_argument("--rounds", type=int, default=12, help="rounds of bare/off/on blocks per model and process")
    p.add_argument("--tiny-block", type=int, default=200, help="steps per block of the tiny loop")
    p.add_argument("--mlp-block", type=int, default=40, help="steps per block of the MLP loop")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of bare,traceml,upstream")
    p.add_argument("--upstream-venv", type=Path, default=Path("/work/upstream-venv"))
    p.add_argument(
        "--make-upstream-venv",
        type=Path,
        metavar="DIR",
        help="build upstream's venv in DIR if it has none (needs PyPI), then use it as --upstream-venv",
    )
    p.add_argument("--boot", type=int, default=4000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, help="write every process's raw blocks to this JSON file")
    p.add_argument("--pin", type=int, default=-1, help="pin the training thread to this CPU (default -1: no pinning)")
    p.add_argument("--report", type=Path, help="print the tables of a --save file (no new measurement)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    if args.report:
        saved = json.loads(args.report.read_text())
        print(f"tables of {args.report} (measured {saved['when']})")
        report_all(saved["results"], saved["cfg"], args.boot, rng)
        return
    if args.make_upstream_venv is not None:
        make_upstream_venv(args.make_upstream_venv)
        args.upstream_venv = args.make_upstream_venv
    models = ["tiny", "mlp"] if args.model == "both" else [args.model]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; expected a subset of {','.join(VARIANTS)}")
    if "upstream" in variants and not (args.upstream_venv / "bin" / "traceml").exists():
        print(f"note: no upstream venv at {args.upstream_venv}; leaving upstream out")
        variants.remove("upstream")
    block = {"tiny": args.tiny_block, "mlp": args.mlp_block}
    cfg = {"models": models, "pre": args.pre, "rounds": args.rounds, "block": block, "pin": args.pin}
    order = [v for v in variants for _ in range(args.procs)]
    rng.shuffle(order)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench_vs_upstream-") as tmp:
        work = Path(tmp)
        loop = work / "loop.py"
        loop.write_text(LOOP)
        for n, v in enumerate(order):
            res = run_process(v, work, loop, cfg, args.upstream_venv, n)
            results[v].append(res)
            firsts = "  ".join(f"{m} on-bare {per_process(res, m, MEAN)['on_bare']:+7.1f}" for m in models)
            print(
                f"[{n + 1:3}/{len(order)}] {v:9} {firsts} µs/step  wall {res['wall_s']:5.1f} s  load {res['load']:.2f}",
                flush=True,
            )
    cfg["procs"] = args.procs
    if args.save:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        args.save.write_text(json.dumps({"when": when, "cfg": cfg, "results": results}))
    report_all(results, cfg, args.boot, rng)


def report_all(results: dict[str, list[dict]], cfg: dict, boot: int, rng: random.Random) -> None:
    for m in cfg["models"]:
        report(results, m, cfg, boot, rng)
    for v in results:
        if v != "bare" and results[v]:
            print(f"\nwhat {v}'s init() and first trace_step changed (toggled for the bare blocks):")
            print("   " + "\n   ".join(results[v][0]["patched"]))
    print(
        "\non - bare: median over a process's rounds of (traced block - block with the profiler's patches taken out),"
        "\n  the training thread's cost of turning the profiler on (its background threads run in both);"
        "\non - off: (traced - untraced with the patches in): what trace_step itself adds;"
        "\noff - bare: what the global patches cost a step that is not inside trace_step;"
        "\nbare - pre: patches-out blocks after init - blocks before init (not paired in time: the background threads"
        "\n  plus any drift; for upstream its runtime threads already run before init, started by its executor);"
        "\non - bare procs: across processes, each variant's median traced block against the bare processes' median"
        "\n  (the process-to-process spread enters here).  The bare variant runs the same schedule with nothing to"
        "\n  switch: its rows are the null control of every estimate.  Ratios: bootstrap of the ratio of medians."
    )


if __name__ == "__main__":
    main()
