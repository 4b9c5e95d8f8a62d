"""Re-record traceml's sample traces (``sample_traces/*.tml``) with ``traceml run``.

    .venv/bin/python scripts/record_samples.py                  # every scenario
    .venv/bin/python scripts/record_samples.py input_bound      # just some
    .venv/bin/python scripts/record_samples.py --check          # re-diagnose the committed files only

Each scenario is a small CPU script in ``examples/scenarios/`` with a *known* behaviour.  It is
recorded for real (aggregator + torchrun + rank runtime) into a temporary directory, diagnosed
with the same code as ``traceml report``, and copied into ``sample_traces/`` only when the
diagnosis shows the known behaviour; a recording that does not (a very loaded machine can blur
timings) is kept out and reported, and the script exits 1.

``sample_traces/expected.json`` is written from the hand-maintained ``SCENARIOS`` table below,
never from what a recording happened to produce: the table is the specification, the
recordings are checked against it (here and in ``tests/test_sample_traces.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_traces"
EXPECTED = SAMPLES / "expected.json"
#: the largest sample file accepted (the repository carries them)
MAX_SAMPLE_BYTES = 1 << 20
#: seconds one recording may take before it is abandoned
RUN_TIMEOUT_S = 300.0
#: seconds between "step N" and the kill: longer than the writer's 1 s segment age and the
#: ranks' send interval, so the steps before the crash are on disk
CRASH_SETTLE_S = 3.0
_STEP_LINE = re.compile(r"^step (\d+)/")


@dataclass(frozen=True)
class Scenario:
    """One sample trace: how to record it and what its diagnosis must say.

    ``findings``: each entry must match one finding of the whole-run diagnosis (``kind`` and,
    when given, ``rank``, ``severity`` and every ``labels`` item).  ``absent``: kinds that must
    not be found.  ``min_steps``: analysed steps at least.  ``readable_steps``: every rank's
    ``step_time`` holds steps 0 .. readable_steps-1 (all the steps of a finished run; those
    before the crash for a crashed one).
    """

    name: str
    script: str
    args: tuple[str, ...]
    description: str
    primary: Mapping[str, Any]
    integrity: str
    min_steps: int
    readable_steps: int
    nproc: int = 1
    interval: float = 0.5
    findings: tuple[Mapping[str, Any], ...] = ()
    absent: tuple[str, ...] = ()
    crash_after_step: int | None = None
    exit_status: str | None = "ok"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return f"{self.name}.tml"

    def run_args(self, out: Path) -> list[str]:
        cmd = ["run", "--ui", "none", "--run-name", self.name, "--out", str(out), "--interval", str(self.interval)]
        if self.nproc > 1:
            cmd += ["--nproc-per-node", str(self.nproc)]
        return [*cmd, self.script, *self.args]

    def command_line(self) -> str:
        return "traceml " + " ".join(self.run_args(Path(self.file)))

    def expected(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "scenario": self.script,
            "command": self.command_line(),
            "crash": (
                None
                if self.crash_after_step is None
                else f"every process of the run SIGKILLed (aggregator first) {CRASH_SETTLE_S:g} s after "
                f"step {self.crash_after_step} was printed"
            ),
            "world_size": self.nproc,
            "primary": dict(self.primary),
            "findings": [dict(f) for f in self.findings],
            "absent": list(self.absent),
            "integrity": self.integrity,
            "min_steps": self.min_steps,
            "readable_steps": self.readable_steps,
            "exit_status": self.exit_status,
        }


# The specification of every sample: written by hand from each scenario's known behaviour and
# the rules of docs/diagnosis.md.  Never fill it from an observed diagnosis.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="compute_bound",
        script="examples/scenarios/compute_bound.py",
        args=("--steps", "200"),
        description="healthy single-rank run: a wide MLP on in-memory tensors; forward + backward + "
        "optimizer fill the step, so the verdict is COMPUTE_BOUND (info), the healthy compute-bound "
        "verdict of docs/diagnosis.md",
        primary={"kind": "COMPUTE_BOUND", "severity": "info"},
        findings=({"kind": "COMPUTE_BOUND", "severity": "info"},),
        absent=("INPUT_BOUND", "RESIDUAL_HEAVY", "STRAGGLER", "MEMORY_CREEP", "INSUFFICIENT_DATA"),
        integrity="complete",
        min_steps=150,
        readable_steps=200,
    ),
    Scenario(
        name="input_bound",
        script="examples/scenarios/input_bound.py",
        args=("--steps", "200", "--sleep-ms", "1.0"),
        description="single rank whose Dataset.__getitem__ sleeps 1 ms per sample (16 per batch) "
        "in front of a tiny model: the dataloader wait dominates the step",
        primary={"kind": "INPUT_BOUND", "severity": "critical"},
        findings=({"kind": "INPUT_BOUND", "severity": "critical"},),
        absent=("COMPUTE_BOUND", "STRAGGLER", "MEMORY_CREEP"),
        integrity="complete",
        min_steps=150,
        readable_steps=200,
    ),
    Scenario(
        name="ddp_input_straggler",
        script="examples/scenarios/ddp_input_straggler.py",
        args=("--steps", "200", "--slow-rank", "1", "--sleep-ms", "1.0"),
        nproc=2,
        description="2-rank DDP (gloo); rank 1's Dataset sleeps 1 ms per sample, rank 0's data is "
        "in memory; rank 0 waits for it inside backward (DDP all-reduce)",
        primary={"kind": "STRAGGLER", "rank": 1},
        findings=({"kind": "STRAGGLER", "rank": 1, "labels": {"cause": "input", "top_phase": "dataloader"}},),
        absent=("COMPUTE_BOUND", "MEMORY_CREEP"),
        integrity="complete",
        min_steps=150,
        readable_steps=200,
    ),
    Scenario(
        name="ddp_compute_straggler",
        script="examples/scenarios/ddp_compute_straggler.py",
        args=("--steps", "200", "--slow-rank", "1", "--extra-matmuls", "8"),
        nproc=2,
        description="2-rank DDP (gloo); rank 1's forward also runs 8 no-grad 256x256 matmuls; rank 0 "
        "waits for it inside backward (DDP all-reduce), so the gap shows in forward",
        primary={"kind": "STRAGGLER", "rank": 1},
        findings=({"kind": "STRAGGLER", "rank": 1, "labels": {"cause": "compute", "top_phase": "forward"}},),
        absent=("INPUT_BOUND", "COMPUTE_BOUND", "MEMORY_CREEP"),
        integrity="complete",
        min_steps=150,
        readable_steps=200,
    ),
    Scenario(
        name="memory_creep",
        script="examples/scenarios/memory_creep.py",
        args=("--steps", "400", "--leak-mb", "1.0"),
        interval=0.2,
        description="single rank that keeps a 1 MiB tensor per step in a list (a leak outside the "
        "step): host RSS grows ~400 MiB steadily; sampled every 0.2 s so the creep is confirmed "
        "(>= 60 samples) and, being a warning, is the primary verdict",
        primary={"kind": "MEMORY_CREEP", "severity": "warn"},
        findings=({"kind": "MEMORY_CREEP", "severity": "warn", "labels": {"source": "rss", "stage": "confirmed"}},),
        absent=("INPUT_BOUND", "STRAGGLER"),
        integrity="complete",
        min_steps=350,
        readable_steps=400,
    ),
    Scenario(
        name="crashed_midway",
        script="examples/scenarios/compute_bound.py",
        args=("--steps", "100000"),
        description="the compute-bound run killed mid-way: every process of `traceml run` SIGKILLed "
        "(the aggregator first), so the file has no footer and no end attachments; the reader "
        "recovers the steps written before the crash, still COMPUTE_BOUND",
        primary={"kind": "COMPUTE_BOUND", "severity": "info"},
        findings=({"kind": "COMPUTE_BOUND"},),
        absent=("INPUT_BOUND", "STRAGGLER", "INSUFFICIENT_DATA"),
        integrity="recovered",
        min_steps=100,
        readable_steps=150,
        crash_after_step=150,
        exit_status=None,
    ),
)


# --- checking a recording against its scenario -------------------------------------------------


def finding_matches(finding: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Whether one finding of a summary has every property ``want`` asks for."""
    for key, value in want.items():
        if key == "labels":
            labels = finding.get("labels") or {}
            if any(labels.get(k) != v for k, v in value.items()):
                return False
        elif finding.get(key) != value:
            return False
    return True


def check_summary(summary: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """What in ``summary`` (a ``traceml report`` summary.json) contradicts ``expected``; [] when all holds."""
    problems: list[str] = []
    diag = summary["diagnosis"]
    primary = diag["primary"]
    for key, value in expected["primary"].items():
        if primary.get(key) != value:
            problems.append(
                f"primary {key}: expected {value!r}, found {primary.get(key)!r} ({primary.get('kind')}: "
                f"{primary.get('summary')})"
            )
    findings = diag["findings"]
    for want in expected["findings"]:
        if not any(finding_matches(f, want) for f in findings):
            found = [(f["kind"], f.get("rank"), f.get("severity"), f.get("labels")) for f in findings]
            problems.append(f"finding {want} expected, found {found}")
    for kind in expected["absent"]:
        hits = [f["summary"] for f in findings if f["kind"] == kind]
        if hits:
            problems.append(f"finding {kind} expected absent, found: {hits[0]}")
    integrity = summary["integrity"]
    if integrity["status"] != expected["integrity"]:
        problems.append(f"integrity: expected {expected['integrity']!r}, found {integrity['status']!r}")
    if integrity["lost"]["bytes"] or integrity["lost"]["skipped_records"]:
        problems.append(f"integrity: expected nothing skipped, found {integrity['message']}")
    if summary["steps"]["count"] < expected["min_steps"]:
        problems.append(f"analysed steps: expected at least {expected['min_steps']}, found {summary['steps']['count']}")
    world = summary["run"]["world_size"]
    if world != expected["world_size"]:
        problems.append(f"world size: expected {expected['world_size']}, found {world}")
    exit_status = summary["run"]["exit_status"]
    if expected["exit_status"] is not None and exit_status != expected["exit_status"]:
        problems.append(f"run exit status: expected {expected['exit_status']!r}, found {exit_status!r}")
    return problems


def check_steps(path: Path, expected: Mapping[str, Any]) -> list[str]:
    """Whether every rank's ``step_time`` in ``path`` holds the steps 0 .. readable_steps-1."""
    import numpy as np

    import replay

    problems: list[str] = []
    want = np.arange(expected["readable_steps"])
    with replay.open(path) as rec:
        for rank in range(expected["world_size"]):
            steps = rec.columns("step_time", rank)["step"] if rank in rec.ranks else np.array([], dtype=np.int64)
            missing = np.setdiff1d(want, steps)
            if len(missing):
                problems.append(
                    f"rank {rank}: steps {missing[:5].tolist()}... ({len(missing)} of the first {len(want)}) not readable"
                )
    return problems


def diagnose_file(path: Path) -> dict[str, Any]:
    """The summary ``traceml report`` would write for ``path`` (same code, no files written)."""
    from replay.report import build_report, load_view

    return build_report(load_view(path), source=str(path)).summary


# --- recording -------------------------------------------------------------------------------------


def _traceml() -> list[str]:
    exe = Path(sys.executable).with_name("traceml")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("traceml")
    if found is None:
        raise SystemExit("traceml is not installed next to this python nor on PATH; run `pip install -e .` first")
    return [found]


def _kill_run(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the run like a crashed machine: the aggregator first (no footer), then everything else."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    aggregators = [p for p in tree if "traceml.aggregator" in " ".join(_cmdline(p))]
    others = [p for p in tree if p not in aggregators]
    for p in [*aggregators, psutil.Process(proc.pid), *others]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def _cmdline(p: Any) -> list[str]:
    try:
        return list(p.cmdline())
    except Exception:
        return []


def record(scenario: Scenario, workdir: Path) -> Path:
    """Record ``scenario`` with ``traceml run`` into ``workdir``; returns the .tml path."""
    out = workdir / scenario.file
    cmd = [*_traceml(), *scenario.run_args(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"  $ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    timed_out = threading.Event()

    def watchdog() -> None:  # a silent, hung run never ends the read loop below on its own
        timed_out.set()
        _kill_run(proc)

    timer = threading.Timer(RUN_TIMEOUT_S, watchdog)
    timer.start()
    killed = False
    log: list[str] = []
    try:
        for line in proc.stdout:
            log.append(line)
            m = _STEP_LINE.match(line)
            if scenario.crash_after_step is not None and m and int(m.group(1)) >= scenario.crash_after_step:
                time.sleep(CRASH_SETTLE_S)
                _kill_run(proc)
                killed = True
                break
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _kill_run(proc)
            proc.wait()
        proc.stdout.close()
    if timed_out.is_set():
        raise SystemExit(f"{scenario.name}: still running after {RUN_TIMEOUT_S:.0f} s; killed")
    if scenario.crash_after_step is not None and not killed:
        raise SystemExit(f"{scenario.name}: the run ended (code {code}) before step {scenario.crash_after_step}")
    if not killed and code != 0:
        sys.stdout.write("".join(log[-40:]))
        raise SystemExit(f"{scenario.name}: `traceml run` exited {code}; its last output is above")
    if not out.is_file():
        raise SystemExit(f"{scenario.name}: no recording at {out}")
    return out


def write_expected(path: Path = EXPECTED) -> None:
    doc = {
        "about": "expected diagnosis of each sample trace; written by scripts/record_samples.py from its "
        "hand-maintained SCENARIOS table (never from an observed verdict); checked by "
        "tests/test_sample_traces.py",
        "max_bytes": MAX_SAMPLE_BYTES,
        "traces": {s.file: s.expected() for s in SCENARIOS},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _describe(summary: Mapping[str, Any]) -> str:
    p = summary["diagnosis"]["primary"]
    rank = "" if p.get("rank") is None else f" rank {p['rank']}"
    labels = p.get("labels") or {}
    extra = f" {labels}" if labels else ""
    return f"{p['kind']} ({p['severity']}){rank}{extra}; {summary['steps']['count']} steps; {summary['integrity']['status']}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "names", nargs="*", help=f"scenarios to record (default all: {', '.join(s.name for s in SCENARIOS)})"
    )
    p.add_argument("--check", action="store_true", help="do not record: diagnose the committed files against the table")
    p.add_argument("--attempts", type=int, default=1, help="recordings tried per scenario before giving up (default 1)")
    p.add_argument(
        "--keep-mismatch", action="store_true", help="copy a recording into sample_traces/ even if it mismatches"
    )
    args = p.parse_args(argv)

    by_name = {s.name: s for s in SCENARIOS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; expected some of {sorted(by_name)}")
    chosen = [by_name[n] for n in args.names] if args.names else list(SCENARIOS)

    write_expected()
    failures: list[str] = []
    for scenario in chosen:
        expected = scenario.expected()
        print(f"{scenario.name}: {scenario.description}", flush=True)
        if args.check:
            target = SAMPLES / scenario.file
            summary = diagnose_file(target)
            problems = check_summary(summary, expected) + check_steps(target, expected)
            size = target.stat().st_size
            if size > MAX_SAMPLE_BYTES:
                problems.append(f"{size} bytes, over the {MAX_SAMPLE_BYTES} limit")
            print(f"  {_describe(summary)}; {size} bytes", flush=True)
            failures += [f"{scenario.name}: {x}" for x in problems]
            continue
        for attempt in range(1, args.attempts + 1):
            with tempfile.TemporaryDirectory(prefix=f"traceml-{scenario.name}-") as tmp:
                out = record(scenario, Path(tmp))
                summary = diagnose_file(out)
                problems = check_summary(summary, expected) + check_steps(out, expected)
                size = out.stat().st_size
                if size > MAX_SAMPLE_BYTES:
                    problems.append(f"{size} bytes, over the {MAX_SAMPLE_BYTES} limit: record fewer steps")
                print(f"  attempt {attempt}: {_describe(summary)}; {size} bytes", flush=True)
                for x in problems:
                    print(f"    MISMATCH {x}", flush=True)
                if not problems or args.keep_mismatch:
                    shutil.copyfile(out, SAMPLES / scenario.file)
                    print(f"  wrote {SAMPLES / scenario.file}", flush=True)
            if not problems:
                break
        else:
            failures += [f"{scenario.name}: {x}" for x in problems]
    print(f"wrote {EXPECTED}")
    if failures:
        print("\nrecordings that do not show their known behaviour:")
        for f in failures:
            print(f"  {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
