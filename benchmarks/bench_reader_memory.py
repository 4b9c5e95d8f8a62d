"""Peak memory of every reader against the rows of a recording (no assertions).

    .venv/bin/python benchmarks/bench_reader_memory.py                   # 1 M and 10 M rows
    .venv/bin/python benchmarks/bench_reader_memory.py --rows 1000000,10000000,100000000

Writes synthetic recordings of 8 ranks (``step_time`` rows plus a process sample every 20
steps, written in chunks so the generator itself stays small), then runs each reader as its own
process and reads its peak resident set (``/usr/bin/time -f %M``, else ``getrusage``): ``inspect
--json``, ``recover``, ``export`` as csv / chrome-trace / parquet, ``report`` and
``replay.open(path)`` reading the step times of one rank; ``compare A A``, terminal ``replay --speed max``
and ``replay.open(path).summary()`` (these four read within the row budget, ``TRACEML_ROW_BUDGET``).  The table shows peak RSS (MiB) and
wall seconds per command and row count; a reader whose memory is flat shows the same figure on
every line, one that holds every row grows with them.  Files and outputs go to a temporary
directory (``--keep DIR`` to reuse the recordings between runs).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANKS = 8
CHUNK_STEPS = 50_000


def make_recording(path: Path, rows: int) -> None:
    sys.path.insert(0, str(ROOT))
    from traceml.format import TmlWriter
    from traceml.testing.synthetic import START_NS, run_meta, synthetic_run

    steps = rows // RANKS
    writer = TmlWriter(path, run_meta=run_meta("memory", RANKS), fsync_interval_s=None, segment_max_bytes=1 << 20)
    start = START_NS
    try:
        for first in range(0, steps, CHUNK_STEPS):
            n = min(CHUNK_STEPS, steps - first)
            run = synthetic_run(ranks=RANKS, steps=n, first_step=first, start_ns=start, seed=first)
            for rank, tables in sorted(run.items()):
                for name, cols in tables.items():
                    writer.append(rank, name, cols)
            start = max(int(c["ts_ns"][-1]) for t in run.values() for c in t.values() if len(c["ts_ns"])) + 1000
    finally:
        writer.close()


def commands(src: Path, out: Path) -> dict[str, list[str]]:
    traceml = str(Path(sys.executable).parent / "traceml")
    summary = (
        "import replay, sys; rec = replay.open(sys.argv[1], progress=False);"
        " print(rec.summary()['traceml/steps/count'])"
    )
    # the replay dashboard's source (its exact statistics), then zooms of 2,000 steps served from
    # the index: prints the zooms' server time
    dashboard = (
        "import replay, sys, time; from replay.dashboard import RecordingSource;"
        " rec = replay.open(sys.argv[1], progress=False); src = RecordingSource(rec, staged=False);"
        " last = max(s.step_max for s in rec.segments if s.step_max is not None); ms = [];"
        " [(t := time.perf_counter(), src.zoomed((a, a + 1999)), ms.append((time.perf_counter() - t) * 1e3))"
        " for a in (last // 4, last // 2, 3 * last // 4)];"
        " print('zoom ms', ' '.join(f'{m:.0f}' for m in ms), 'bounded' if src.bounded else 'whole')"
    )
    one_rank = (
        "import replay, sys; rec = replay.open(sys.argv[1]); c = rec.columns('step_time', rank=0);"
        " print(len(c['step']))"
    )
    return {
        "inspect --json": [traceml, "inspect", str(src), "--json"],
        "recover": [traceml, "recover", str(src), "-o", str(out / "recovered.tml")],
        "export csv": [traceml, "export", str(src), "--format", "csv", "-o", str(out / "csv")],
        "export chrome-trace": [traceml, "export", str(src), "--format", "chrome-trace", "-o", str(out / "t.json")],
        "export parquet": [traceml, "export", str(src), "--format", "parquet", "-o", str(out / "pq")],
        "report": [traceml, "report", str(src), "--out", str(out / "report")],
        "compare A A": [traceml, "compare", str(src), str(src)],
        "replay --speed max": [traceml, "replay", str(src), "--speed", "max", "--no-progress"],
        "replay.open summary": [sys.executable, "-c", summary, str(src)],
        "replay.open, one rank": [sys.executable, "-c", one_rank, str(src)],
        "dashboard source + zoom": [sys.executable, "-c", dashboard, str(src)],
    }


def peak_rss_mib(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(peak RSS MiB, wall s, exit code) of one command run as its own process."""
    t0 = time.perf_counter()
    if Path("/usr/bin/time").exists():
        r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.stdout.strip().startswith("zoom ms") or r.returncode:
            print("    " + (r.stdout.strip().splitlines() or [""])[-1] + " " + r.stderr.strip()[-300:], flush=True)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "0"
        kib = int(last) if last.isdigit() else 0
        return kib / 1024, wall, r.returncode
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (after if after > before else float("nan")) / 1024, wall, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,10000000")
    ap.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the recordings here")
    ap.add_argument("--only", default="", help="comma-separated command names to run")
    ap.add_argument("--make-only", action="store_true", help="write the recordings and run nothing")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="bench_reader_memory-") as tmp_dir:
        base = args.keep or Path(tmp_dir)
        base.mkdir(parents=True, exist_ok=True)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {RANKS} ranks; peak RSS MiB (wall s)")
        results: dict[str, dict[int, tuple[float, float, int]]] = {}
        sizes = [int(r) for r in args.rows.split(",")]
        for rows in sizes:
            src = base / f"rows{rows}.tml"
            if not src.exists():
                t0 = time.perf_counter()
                make_recording(src, rows)
                print(f"wrote {src.name}: {src.stat().st_size / 2**20:,.0f} MiB in {time.perf_counter() - t0:.0f} s")
            if args.make_only:
                continue
            for name, cmd in commands(src, base / f"out{rows}").items():
                if args.only and name not in args.only.split(","):
                    continue
                out = base / f"out{rows}"
                if out.exists():
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                out.mkdir(parents=True)
                results.setdefault(name, {})[rows] = peak_rss_mib(cmd, env)
                mib, wall, code = results[name][rows]
                print(f"  {name:24} {rows:>12,} rows: {mib:8,.0f} MiB {wall:7.1f} s  exit {code}", flush=True)
        print()
        print(f"{'reader':24}" + "".join(f"{r:>22,}" for r in sizes))
        for name, by_rows in results.items():
            cells = "".join(
                f"{f'{by_rows[r][0]:,.0f} MiB ({by_rows[r][1]:.0f} s)':>22}" if r in by_rows else f"{'-':>22}"
                for r in sizes
            )
            print(f"{name:24}{cells}")


if __name__ == "__main__":
    main()
